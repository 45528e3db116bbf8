"""`jaxtree-lora compare`: every method in its own process, one table from their results.json, and a
method that cannot learn the stream's kind reported as n/a instead of failing the comparison."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxtree_lora.methods.base import MethodNotApplicable
from jaxtree_lora.methods.seqlora import SeqLoRA

from test_loop import make_run, tiny_config
from test_paper_configs import write_tiny_llama_and_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from experiments.configs import default


def get_config(arg=""):
    config = default.get_config()
    config.model.name, config.model.kind, config.model.path = "hf", "decoder", {llama!r}
    config.data = dict(name="trace", root={trace!r}, tasks=["FOMC", "Py150"], max_train=0, max_eval=0,
                       max_prompt_len=8, max_answer_len=2, chat_template=False)
    config.lora.targets, config.lora.rank = ["attn.q_proj", "attn.v_proj"], 2
    config.train.batch_size, config.train.epochs, config.eval.batch_size = 4, 1, 4
    return config
'''


def assert_training_loss_falls(metrics_path):
    """Every task's mean training loss over its last two epochs (8 epochs at lr 1e-2 on the same 8 rows)
    is at least 15% below the first task's first epoch, the untrained model's loss on this kind of data:
    the method learned. Without updates each task's loss stays near that start (the tasks' data have the
    same form) and only dropout noise moves it."""
    steps = [r for r in map(json.loads, open(metrics_path)) if r["type"] == "step"]
    loss = lambda task, epochs: np.mean([r["loss"] for r in steps if r["task"] == task and r["epoch"] in epochs])
    start = loss(0, {0})
    for task in sorted({r["task"] for r in steps}):
        assert loss(task, {6, 7}) < 0.85 * start, \
            f"{metrics_path.parent.name}, task {task}: training loss {loss(task, {6, 7}):.3f}, untrained {start:.3f}"


def test_compare_runs_each_method_in_its_own_process_and_tabulates(tmp_path):
    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    config = tmp_path / "tiny_trace.py"
    config.write_text(CONFIG.format(llama=llama, trace=trace))
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "compare", "--config", str(config),
                          "--methods", "seqlora,treelora", "--workdir", str(tmp_path / "cmp"), "--no-progress",
                          "--markdown", str(tmp_path / "table.md"), "--config.train.epochs=8",
                          "--config.optimizer.learning_rate=1e-2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("seqlora", "treelora"):
        results = json.load(open(tmp_path / "cmp" / name / "results.json"))
        # treelora on this instruction stream runs its LLM form, and results.json names the form.
        assert results["method"] == {"treelora": "treelora_llm"}.get(name, name), "each method wrote its own results.json"
        assert np.isfinite(results["metrics"]["average_accuracy"])
        assert_training_loss_falls(tmp_path / "cmp" / name / "metrics.jsonl")
    table = (tmp_path / "table.md").read_text()
    assert "| seqlora |" in table and "| treelora_llm |" in table, "both methods are rows of the Markdown table (a form by its name)"
    assert "--methods seqlora,treelora" in table, "the table records the command"


def test_a_method_for_another_kind_of_stream_is_not_applicable(tmp_path):
    class InstructionOnly(SeqLoRA):
        name = "instruction_only"
        stream_kinds = ("instruction",)

    import jaxtree_lora.train.loop as loop

    original = loop.method_from_config
    loop.method_from_config = lambda config, kind, max_tasks: InstructionOnly(
        lora=original(config, kind, max_tasks).lora)
    try:
        with pytest.raises(MethodNotApplicable, match="instruction"):
            make_run(tiny_config("seqlora"), tmp_path / "run")
    finally:
        loop.method_from_config = original


@pytest.mark.slow  # seven CLI processes (~60 s); the fast test above covers compare's table
def test_compare_over_seeds_gives_mean_and_spread_with_the_fix_row(tmp_path):
    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    config = tmp_path / "tiny_trace.py"
    config.write_text(CONFIG.format(llama=llama, trace=trace))
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "compare", "--config", str(config),
                          "--methods", "fix,seqlora", "--seeds", "0,1", "--workdir", str(tmp_path / "cmp"),
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for seed in (0, 1):
        for name in ("fix", "seqlora"):
            results = json.load(open(tmp_path / "cmp" / f"seed_{seed}" / name / "results.json"))
            assert results["seed"] == seed and results["config"]["data"].get("seed", seed) == seed, \
                "each seed runs in its own work directory with its own seed"
    fix = [json.load(open(tmp_path / "cmp" / f"seed_{s}" / "fix" / "results.json")) for s in (0, 1)]
    assert all(r["time"]["train_seconds"] < 1.0 and r["protocol"]["lora"] is None for r in fix), "fix trains nothing"
    summary = json.load(open(tmp_path / "cmp" / "comparison.json"))
    per_seed = [r["metrics"]["average_accuracy"] for r in summary["per_seed"]["seqlora"]]
    assert len(per_seed) == 2 and summary["methods"]["seqlora"]["avg acc"]["mean"] == pytest.approx(np.mean(per_seed))
    assert "vs fix" in out.stdout and "± " in out.stdout, "the printed table gives mean ± std and the fix marks"
    assert (tmp_path / "cmp" / "comparison.png").exists() and (tmp_path / "cmp" / "comparison.md").exists()
    assert (tmp_path / "cmp" / "compare.png").exists(), "the average accuracy after every task, with its seed band"
    # An interrupted comparison resumes: finished runs are reused (not run again), unfinished ones run.
    os.remove(tmp_path / "cmp" / "seed_1" / "seqlora" / "results.json")
    shutil.rmtree(tmp_path / "cmp" / "seed_1" / "seqlora" / "checkpoints", ignore_errors=True)
    again = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "compare", "--config", str(config),
                            "--methods", "fix,seqlora", "--seeds", "0,1", "--workdir", str(tmp_path / "cmp"),
                            "--no-progress", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("holds a finished run: reused") == 3, "the three finished runs are not run again"
    rerun = json.load(open(tmp_path / "cmp" / "seed_1" / "seqlora" / "results.json"))
    assert rerun["metrics"]["average_accuracy"] == summary["per_seed"]["seqlora"][1]["metrics"]["average_accuracy"], \
        "the one unfinished run ran again, to the same result"
