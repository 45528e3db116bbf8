"""The README's main job (TreeLoRA on the real DINOv2 ViT-S/14 over Fashion-MNIST) and `jaxtree-lora run`
(its default config: all-MiniLM-L6-v2 on real text), each over a shortened stream: the work directory
they promise (results.json with a learned accuracy matrix, accuracy_matrix.png, tree.png, restorable
checkpoints) and the frozen model's score printed beside the run's. Needs the offline assets."""
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtree_lora import assets, checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shortened(per_class_train: int, per_class_test: int) -> list[str]:
    """Two tasks (the stream's classes split in two), few examples, one epoch, HiDe's head trainers
    shortened: a job's code path unchanged (TreeLoRA in HiDe's form) in about a minute on 2 cores."""
    return ["--config.data.num_tasks=2", f"--config.data.per_class_train={per_class_train}",
            f"--config.data.per_class_test={per_class_test}", "--config.train.epochs=1",
            "--config.method.hide_lora.tii_epochs=5", "--config.method.hide_lora.tap_epochs=5"]


def run_cli(arguments: list[str], workdir, needs: tuple[str, ...]):
    """`jaxtree-lora ARGUMENTS --workdir WORKDIR --no-progress` in a fresh process (skipped without the
    assets `needs`) -> (its stdout, its results.json). Fails with the run's stderr if it fails."""
    for name in needs:
        try:
            assets.path(name)
        except assets.AssetMissing:
            pytest.skip(f"asset {name} not installed (run `jaxtree-lora assets`)")
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", *arguments, "--workdir", str(workdir),
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads((workdir / "results.json").read_text())


@pytest.mark.assets
@pytest.mark.slow  # real MiniLM: loading, two tasks trained and evaluated
def test_jaxtree_lora_run_writes_its_work_directory(tmp_path):
    workdir = tmp_path / "run"
    stdout, results = run_cli(["run", *shortened(32, 16)], workdir, needs=("minilm", "scattertext"))
    assert "accuracy matrix" in stdout, "the matrix is printed"
    assert results["method"] == "treelora_hide" and len(results["tasks"]) == 2, "treelora runs its HiDe form here"
    matrix = np.asarray(results["accuracy_matrix"], float)
    assert matrix.shape == (2, 2)
    seen = matrix[np.triu_indices(2)]  # R[i, j]: task i after training task j >= i
    assert np.all((seen >= 0) & (seen <= 100)), f"accuracies outside [0, 100]: {matrix}"
    # Each task is scored over every class seen so far: chance on the diagonal is 1 / (classes seen).
    seen_classes = np.cumsum([task.count("+") + 1 for task in results["tasks"]])
    chance = 100.0 / seen_classes
    assert np.all(np.diag(matrix) >= chance + 20), f"the real features learned nothing: {matrix}, chance {chance}"
    for name in ("accuracy_matrix.png", "tree.png"):
        from PIL import Image

        with Image.open(workdir / name) as image:
            assert image.format == "PNG" and min(image.size) >= 100
            image.verify()
    checkpoints = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"))
    try:
        assert checkpoints.latest() is not None, "no checkpoint written"
        loop = checkpoints.restore_loop()
        np.testing.assert_allclose(np.asarray(loop["matrix"], float)[np.triu_indices(2)], seen,
                                   err_msg="the last checkpoint holds the run's accuracy matrix")
        import orbax.checkpoint as ocp

        state = checkpoints.manager.restore(checkpoints.latest(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
        trained = [np.asarray(leaf) for leaf in jax.tree.leaves(state["trainable"])]
        assert trained and all(np.all(np.isfinite(leaf)) for leaf in trained), \
            "the checkpointed adapters and head restore whole and finite"
    finally:
        checkpoints.close()


def readme_main_job() -> list[str]:
    """The arguments after `jaxtree-lora` on the README's first command line (its install-and-run line)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        block = file.read().split("```")[1]
    line = next(line for line in block.splitlines() if "jaxtree-lora" in line)
    return shlex.split(line.split("jaxtree-lora", 1)[1])


@pytest.mark.assets
@pytest.mark.slow  # real DINOv2 ViT-S/14: loading from ONNX, two tasks trained and evaluated
def test_the_readme_main_job_runs_treelora_on_the_real_vit_and_prints_the_frozen_score(tmp_path):
    args = readme_main_job()
    assert args[:3] == ["run", "--config", "experiments/configs/offline_fashion_cil.py:quick"], args
    stdout, results = run_cli([*args, *shortened(16, 8)], tmp_path / "run", needs=("dinov2_small", "fashion_mnist"))
    assert (results["method"], results["stream"]) == ("treelora_hide", "offline-fashion-cil"), "TreeLoRA's ViT form"
    matrix = np.asarray(results["accuracy_matrix"], float)
    assert np.all(np.diag(matrix) >= 100.0 / 5 + 20), f"the real ViT learned nothing: {matrix} (5 classes a task)"
    line = re.search(r"average accuracy: treelora_hide ([0-9.]+) \| fix \(frozen NCM\) ([0-9.]+)", stdout)
    assert line, "the run prints its score beside the frozen model's"
    assert float(line.group(1)) == pytest.approx(results["metrics"]["average_accuracy"], abs=0.01)
