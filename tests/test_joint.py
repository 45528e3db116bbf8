"""The `joint` upper bound: one training set with every class, a held-out part per class, a selection
that includes the linear probe and picks by held-out accuracy, a final model scored like the others,
and the comparison tables and plot that show it beside `fix` with the stream's headroom."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora.errors import ConfigError
from jaxtree_lora.reporting import plots, results as results_lib, seeds as seeds_lib, tables
from jaxtree_lora.train import backbone as backbone_lib
from jaxtree_lora.train import joint as joint_lib
from jaxtree_lora.train.joint import JointRun, choose, fit_probe, holdout_rows, merge_stream, probe_accuracy

from test_loop import make_run, synthetic_stream, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def joint_config(**options):
    config = tiny_config("joint")
    config.method.joint.probe_steps = 200
    for key, value in options.items():
        config.method.joint[key] = value
    return config


def test_the_merged_training_set_holds_every_task_and_class():
    stream = synthetic_stream(num_tasks=3, classes_per_task=2, rows=24)
    merged = merge_stream(stream)
    assert len(merged.tasks) == 1, "one task: every task's data at once"
    task = merged.tasks[0]
    assert task.classes == tuple(range(6)), "one head over every class of the stream"
    assert len(task.train) == sum(len(t.train) for t in stream.tasks), "no training row lost or repeated"
    assert sorted(np.unique(task.train.labels)) == list(range(6))
    expected = np.concatenate([t.train.inputs["input_ids"] for t in stream.tasks])
    np.testing.assert_array_equal(task.train.inputs["input_ids"], expected)


def test_the_held_out_part_is_seeded_and_takes_a_share_of_every_class():
    split = synthetic_stream(num_tasks=1, classes_per_task=2, rows=40).tasks[0].train  # 20 rows per class
    kept, held = holdout_rows(split, "classification", 0.25, seed=3, task=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(split)
    for label in (0, 1):
        assert np.sum(split.labels[held] == label) == 5, "a quarter of each class's 20 rows"
    again = holdout_rows(split, "classification", 0.25, seed=3, task=0)[1]
    other = holdout_rows(split, "classification", 0.25, seed=4, task=0)[1]
    np.testing.assert_array_equal(held, again)
    assert not np.array_equal(held, other), "another seed holds out other rows"


def test_choose_takes_the_best_held_out_score_and_the_probe_on_a_tie():
    probe = {"candidate": "probe", "heldout": 60.0}
    worse = {"candidate": "lp-ft", "learning_rate": 1e-3, "epochs": 1, "heldout": 40.0}
    diverged = {"candidate": "lp-ft", "learning_rate": 1e-3, "epochs": 2, "heldout": None}
    assert choose([probe, worse, diverged]) is probe, "fine-tuning that hurts is not chosen"
    tie = {"candidate": "lp-ft", "learning_rate": 1e-4, "epochs": 1, "heldout": 60.0}
    assert choose([probe, tie]) is probe, "fine-tuning must beat the probe to be chosen"
    better = {"candidate": "lp-ft", "learning_rate": 1e-4, "epochs": 2, "heldout": 61.0}
    assert choose([probe, tie, better]) is better
    with pytest.raises(ConfigError, match="learning_rates"):
        choose([diverged])


def test_the_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8) * 3.0
    labels = np.repeat(np.arange(4), 20)
    features = centres[labels] + 0.3 * rng.normal(size=(80, 8))
    head = fit_probe(jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32), jnp.zeros(2, jnp.uint32),
                     0.0, 1e-1, 20.0, num_classes=4, kind="linear", steps=200)
    assert probe_accuracy(head, features, labels, "linear", 20.0) == 100.0
    # The same accuracy as the logits written out by hand.
    by_hand = np.argmax(features @ np.asarray(head["w"]) + np.asarray(head["b"]), axis=1)
    assert np.mean(by_hand == labels) == 1.0


def test_joint_chooses_the_probe_where_fine_tuning_hurts_and_scores_every_task(tmp_path):
    # A rate of 30 wrecks the adapters and the head in one epoch: the held-out score falls below the probe's.
    config = joint_config(learning_rates=(30.0,), max_epochs=1, probe_l2=(0.0,))
    stream = synthetic_stream()
    run = JointRun(config=config, backbone=backbone_lib.build(config), stream=stream, workdir=str(tmp_path),
                   progress=False)
    outcome = run.fit()
    selection = outcome["selection"]
    probe = next(c for c in selection["candidates"] if c["candidate"] == "probe")
    tuned = [c for c in selection["candidates"] if c["candidate"] == "lp-ft"]
    assert len(tuned) == 1 and tuned[0]["heldout"] is not None and tuned[0]["heldout"] < probe["heldout"], \
        "the hand-made bad rate should hurt on held-out data"
    assert selection["chosen"] is probe, "the probe is a candidate and wins where fine-tuning hurts"
    assert selection["heldout_rows"] > 0 and selection["fit_rows"] + selection["heldout_rows"] == 3 * 24
    # The final model is the probe on every training row: its scores, from the evaluator, equal the
    # probe's accuracy computed here from the pre-trained features over every class.
    features, labels = run._features(run.stream.tasks[0].train)
    head = run._probe(features, labels, 0.0)
    matrix = outcome["matrix"]
    for index, task in enumerate(stream.tasks):
        test_features, test_labels = run._features(task.test)
        expected = probe_accuracy(head, test_features, test_labels, "linear", 20.0)
        assert matrix[index, -1] == pytest.approx(expected), f"task {index} scored over every class"
        assert np.all(matrix[index, index:] == matrix[index, -1]), "one model: the same score in every column"
        assert np.all(np.isnan(matrix[index, :index]))
    results = results_lib.build_results(
        matrix=matrix, task_names=[t.name for t in stream.tasks], method="joint", method_config={}, config={},
        timings=outcome["timings"], wall_seconds=1.0, trainable_parameters=1, backbone_parameters=10,
        peak_memory_mb=None, stream="synthetic", ncm_matrix=outcome["ncm_matrix"], continual_run=False)
    metrics = results["metrics"]
    assert metrics["average_accuracy"] == pytest.approx(np.mean(matrix[:, -1]))
    assert metrics["bwt_trace"] is None and metrics["forgetting"] is None and results["continual"] is False, \
        "BWT and forgetting mean nothing for one model trained on every task"
    assert "chosen: probe" in joint_lib.describe_selection(selection)


def test_joint_is_refused_where_it_cannot_apply(tmp_path):
    config = joint_config()
    config.eval.classifier = "prototype"
    with pytest.raises(ConfigError, match="eval.classifier"):
        JointRun(config=config, backbone=backbone_lib.build(config), stream=synthetic_stream(),
                 workdir=str(tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match="every task at once"):
        make_run(joint_config(), tmp_path / "b").fit()  # the continual loop would mislabel SeqLoRA as joint


def test_impossible_selection_options_are_refused_in_one_line(capsys):
    from jaxtree_lora import cli

    for key, value in (("holdout", 1.0), ("learning_rates", [0.0]), ("probe_steps", 0), ("probe_l2", [])):
        status = cli.main(["run", "--dry_run", "--config.method.name=joint", f"--config.method.joint.{key}={value}"])
        error = capsys.readouterr().err
        assert status == 2, (key, error)
        assert len(error.strip().splitlines()) == 1 and key in error and "config.method.joint" in error, error


def fake(method, seed, accuracy, continual=True, curve=(70.0, 60.0)):
    matrix = [[curve[0], curve[1]], [None, curve[1]]]
    return {"method": method, "seed": seed, "continual": continual, "accuracy_matrix": matrix,
            "protocol": {"task_identity": "free"},
            "metrics": {"average_accuracy": accuracy, "average_incremental_accuracy": None if not continual else 65.0},
            "time": {"train_seconds": 1.0}}


def test_the_comparison_puts_joint_beside_fix_with_the_headroom():
    rows = [fake("seqlora", 0, 40.0), fake("fix", 0, 56.25), fake("treelora", 0, 45.0), fake("joint", 0, 68.5, False)]
    table = tables.format_comparison(rows).splitlines()
    names = [line.split()[0] for line in table[2:6]]
    assert names == ["seqlora", "fix", "joint", "treelora"], "joint right after fix"
    assert "joint (not continual)" in table[4]
    assert table[-1].startswith("headroom (joint − fix, avg acc): +12.25 points")
    markdown = tables.format_comparison(rows, markdown=True)
    assert "| joint (not continual) |" in markdown and "- headroom (joint − fix, avg acc): +12.25" in markdown


def test_a_single_seed_table_has_no_marks_and_gives_the_headroom():
    aggregated = seeds_lib.aggregate({"fix": [fake("fix", 0, 56.0)], "seqlora": [fake("seqlora", 0, 30.0)],
                                      "joint": [fake("joint", 0, 70.0, False)]})
    table = seeds_lib.format_seed_table(aggregated)
    markdown = seeds_lib.format_seed_table(aggregated, markdown=True)
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["fix", "joint (not continual)", "seqlora"]
    assert all(cell.strip() == "" for r in rows for cell in r[-2:]), "one seed: the spread is unknown, no marks"
    assert "headroom (joint − fix, avg acc): +14.00 points" in table and "one seed" in table
    assert "nothing useful learned" not in table, "no verdict without a spread"


def test_compare_png_draws_a_curve_per_method_and_joint_as_a_line(tmp_path):
    per_method = {"fix": [fake("fix", 0, 60.0, curve=(60.0, 60.0)), fake("fix", 1, 62.0, curve=(62.0, 62.0))],
                  "seqlora": [fake("seqlora", s, 30.0) for s in (0, 1)],
                  "joint": [fake("joint", s, 70.0, False, curve=(80.0, 70.0)) for s in (0, 1)],
                  "other": [{"method": "other", "not_applicable": "needs instructions"}]}
    np.testing.assert_allclose(plots.average_accuracy_curve(per_method["seqlora"][0]), [70.0, 60.0])
    path = plots.plot_average_accuracy(per_method, str(tmp_path / "compare.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_runs_joint_on_an_instruction_stream_beside_fix(tmp_path):
    from test_cli_compare import CONFIG
    from test_paper_configs import write_tiny_llama_and_trace

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    config = tmp_path / "tiny_trace.py"
    config.write_text(CONFIG.format(llama=llama, trace=trace))
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "compare", "--config", str(config),
                          "--methods", "joint,fix", "--workdir", str(tmp_path / "cmp"), "--no-progress",
                          "--config.method.joint.learning_rates=[0.001]"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.load(open(tmp_path / "cmp" / "joint" / "results.json"))
    chosen = results["selection"]["chosen"]
    assert results["continual"] is False and results["metrics"]["bwt_trace"] is None
    assert chosen["heldout"] == max(c["heldout"] for c in results["selection"]["candidates"]
                                    if c["heldout"] is not None), "the best held-out candidate is chosen"
    assert "pre-trained" in [c["candidate"] for c in results["selection"]["candidates"]]
    lines = out.stdout.splitlines()
    table_rows = [line.split()[0] for line in lines if line.split() and line.split()[0] in ("fix", "joint")]
    assert table_rows[-2:] == ["fix", "joint"], "joint sits after fix whatever order --methods gives"
    assert any(line.startswith("headroom (joint − fix") for line in lines)
    assert (tmp_path / "cmp" / "compare.png").exists()
