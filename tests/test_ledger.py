"""The time ledger (every second of a run on one line, compile apart) and the passes it made visible:
features that never change computed once per example per run, and generation that stops at the
tokens a task's metric reads."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import ledger as ledger_lib
from jaxtree_lora.data import batching
from test_loop import make_run, synthetic_stream, tiny_config


def test_phases_are_exclusive_and_sum_to_the_wall():
    ledger = ledger_lib.Ledger(since_process_start=False)
    try:
        with ledger.phase("outer"):
            with ledger.phase("inner"):
                fresh = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.arange(7.0))  # a new program: compiled here
                fresh(jnp.ones(7)).block_until_ready()
            list(ledger.timed("passes", iter(range(3))))
        table = ledger.table()
    finally:
        ledger.close()
    phases = table["phases"]
    assert {"outer", "inner", "passes", "compile", "other"} <= set(phases), f"a phase is missing: {phases}"
    assert phases["compile"] > 0, "the jit compile inside a phase was not taken out of it"
    assert table["calls"]["passes"] == 4, "each step of a timed iterator (and its end) is one call"
    assert sum(phases.values()) == pytest.approx(table["wall_seconds"], rel=1e-6, abs=1e-6), \
        "the ledger's lines do not add up to the wall"
    assert all(seconds >= 0 for seconds in phases.values()), f"a negative line: {phases}"


def test_first_ledger_counts_the_start_up_since_the_process_began(monkeypatch):
    monkeypatch.setattr(ledger_lib, "_startup_claimed", False)
    first, second = ledger_lib.Ledger(), ledger_lib.Ledger()
    try:
        assert first.table()["phases"].get("startup", 0) > 0, "the process's start-up before the ledger is missing"
        assert "startup" not in second.table()["phases"], "a second run of the same process counted start-up again"
    finally:
        first.close(), second.close()


def test_start_up_excludes_what_the_process_did_before_it_became_python():
    """`bash -c "A && jaxtree-lora run"` execs the run into the shell's process: counting from the
    process's creation put A (a 50 s pip install, measured) into the run's start-up line."""
    import subprocess
    import sys

    probe = f"{sys.executable} -c 'from jaxtree_lora import ledger; print(ledger.process_age_seconds())'"
    exec_age = float(subprocess.run(["bash", "-c", f"sleep 2 && {probe}"], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
    assert 0 < exec_age < 1.5, f"start-up {exec_age:.2f} s counts the shell's 2 s sleep before the exec"


def test_a_run_accounts_for_every_phase(tmp_path):
    """A tiny TreeLoRA run (HiDe form: extra passes at each task's end, inferred task identity)."""
    config = tiny_config("treelora")
    config.method.treelora.form = "hide"
    run = make_run(config, tmp_path / "run")
    outcome = run.fit()
    table = outcome["time"]
    phases = table["phases"]
    for name in ("setup", "compile", "train", "end_task: treelora_hide", "pass: pre-trained features", "pass: features",
                 "prototypes", "evaluation", "evaluation: recomputed prototypes", "checkpoint", "other",
                 # HiDe's own parts of its end of task (`TaskContext.phase`), each its own line
                 "end_task: treelora_hide: class statistics", "end_task: treelora_hide: head training"):
        assert name in phases, f"phase {name!r} missing from the ledger: {sorted(phases)}"
    assert sum(phases.values()) == pytest.approx(table["wall_seconds"], rel=1e-6, abs=1e-6)


def rows_forwarded(stream, eval_batch: int) -> int:
    """Rows (padding included) of one pass over every task's train and test split in evaluation batches."""
    return sum(batching.num_batches(len(split.labels), eval_batch) * eval_batch
               for task in stream.tasks for split in (task.train, task.test))


def test_fix_forwards_each_example_once_per_run(tmp_path):
    stream = synthetic_stream(num_tasks=3)
    config = tiny_config("fix")
    run = make_run(config, tmp_path / "run", stream=stream)
    outcome = run.fit()
    assert run.evaluator.fixed_features
    assert run.evaluator.forward_count == rows_forwarded(stream, int(config.eval.batch_size)), (
        "fix forwarded examples more than once: its features never change")
    # The same run recomputing every feature (the path of a method that trains) scores the same.
    again = make_run(config, tmp_path / "again", stream=stream)
    again.evaluator.fixed_features = False
    recomputed = again.fit()
    assert again.evaluator.forward_count > run.evaluator.forward_count
    np.testing.assert_array_equal(outcome["matrix"], recomputed["matrix"])
    np.testing.assert_array_equal(outcome["ncm_matrix"], recomputed["ncm_matrix"])
    assert outcome["recomputed_prototype_scores"] == recomputed["recomputed_prototype_scores"]


def test_kept_pretrained_features_equal_recomputed_ones(tmp_path):
    config = tiny_config("treelora")
    config.method.treelora.form = "hide"
    run = make_run(config, tmp_path / "run")
    run.fit()
    evaluator = run.evaluator
    kept = [key for key in evaluator._frozen_features if key[0] == "pretrained"]
    assert kept, "the inferred task identity kept no pre-trained features"
    for _, task, split in kept:
        arrays = dict(getattr(run.stream.tasks[task], split).inputs)
        arrays["labels"] = np.asarray(getattr(run.stream.tasks[task], split).labels, np.int32)
        for stored, batch in zip(evaluator._frozen_features[("pretrained", task, split)],
                                 evaluator.batches(arrays, task)):
            batch.pop("weight"), batch.pop("labels")
            fresh = np.asarray(evaluator.pretrained_features(evaluator.host_batch(batch)))
            np.testing.assert_array_equal(stored, fresh, err_msg=f"kept features of task {task} {split} changed")
    # The recomputed-prototype diagnostic read the last column's features; recomputed, it is the same.
    kept_scores = evaluator.recomputed_prototype_scores(run.final_state)
    evaluator._final = None
    assert kept_scores == evaluator.recomputed_prototype_scores(run.final_state), (
        "the diagnostic from the last column's kept features differs from recomputing them")


def test_generation_stopped_at_a_limit_keeps_the_tokens_before_it():
    from flax import nnx

    from jaxtree_lora.models import llama
    from jaxtree_lora.models.generate import generate

    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64, rope_theta=100.0)
    module = llama.LlamaDecoder(config, rngs=nnx.Rngs(3))
    module.embed.set_value(module.embed[...] * 50)  # well-separated greedy choices
    module.lm_head.set_value(module.lm_head[...] * 50)
    graphdef, params = nnx.split(module)
    ids = jnp.asarray([[0, 5, 9, 13], [7, 1, 22, 30]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)
    run = jax.jit(lambda p, limit: generate(nnx.merge(graphdef, p), ids, mask, max_new_tokens=8, eos_id=-1,
                                            pad_id=39, limit=limit))
    full = np.asarray(run(params, jnp.int32(8)))
    for limit in (1, 3, 5):
        limited = np.asarray(run(params, jnp.int32(limit)))
        np.testing.assert_array_equal(limited[:, :limit], full[:, :limit],
                                      err_msg=f"stopping at {limit} tokens changed the tokens before it")
        assert (limited[:, limit:] == 39).all(), f"tokens after the limit {limit} are not padding"
    assert run._cache_size() == 1, "a new limit compiled generation again"


def test_decode_limit_follows_the_metric():
    from types import SimpleNamespace

    from jaxtree_lora.evaluation.evaluator import DECODE_MARGIN, Evaluator

    tokenizer = lambda text, add_special_tokens=False: {"input_ids": text.split()}
    tasks = [SimpleNamespace(max_new_tokens=16, metric="accuracy", test=SimpleNamespace(answers=["a b", "c"])),
             SimpleNamespace(max_new_tokens=16, metric="rouge_l", test=SimpleNamespace(answers=["a"])),
             SimpleNamespace(max_new_tokens=2, metric="first_char", test=SimpleNamespace(answers=["a b c"]))]
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.stream, evaluator.backbone, evaluator._limits = SimpleNamespace(tasks=tasks), \
        SimpleNamespace(tokenizer=tokenizer), {}
    assert [evaluator.decode_limit(task) for task in range(3)] == [2 + DECODE_MARGIN, 16, 2], (
        "accuracy reads the longest reference (2 tokens) + EOS and a margin for leading whitespace; "
        "rouge_l reads everything; never above the budget")


@pytest.mark.slow  # three CLI processes of a tiny model
def test_run_profile_quick_prints_json(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.run_profile", "--tiny", "--quick", "--jobs", "stream10",
         "--methods", "fix", "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": root, "JAXTREE_LORA_XLA_CACHE": "off"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = json.loads(completed.stdout.strip().splitlines()[-1])["stream10"]["fix"]
    assert "evaluation" in table["phases"] and "startup" in table["phases"]
    assert sum(table["phases"].values()) == pytest.approx(table["wall_seconds"], abs=1e-3)
    counted = table["train_seconds"] + table["eval_seconds"]
    assert table["ratio"] == pytest.approx(table["wall_seconds"] / counted)
    assert table["method_training_seconds"] == 0.0, "fix trains nothing of its own at a task's end"
    tool = sum(table["phases"][name] for name in ("startup", "weights", "data", "setup", "compile", "checkpoint",
                                                  "reports", "other") if name in table["phases"])
    assert table["tool_overhead_seconds"] == pytest.approx(tool), "a tool line missed or a method line counted"
    assert table["ratio_tool_overhead"] == pytest.approx(table["wall_seconds"] / (table["wall_seconds"] - tool))


def test_a_run_that_raises_leaves_no_monitoring_listener(tmp_path):
    """Run.fit with its own ledger unregisters the ledger's jax.monitoring listener when it raises too:
    otherwise every failed fit in a process (a notebook, a sweep) leaves one more listener behind."""
    from jax._src import monitoring
    from jaxtree_lora.train.loop import StopRequested

    before = len(monitoring.get_event_time_span_listeners())
    run = make_run(tiny_config("seqlora"), tmp_path / "run", stop_after_steps=1)
    assert len(monitoring.get_event_time_span_listeners()) == before + 1, "the run's own ledger listens"
    with pytest.raises(StopRequested):
        run.fit()
    assert len(monitoring.get_event_time_span_listeners()) == before
