"""Damaged checkpoints: the newest checkpoint truncated, its bytes changed, its metadata garbage or a
part of it missing is detected, reported in one line, and the run resumes from the previous good one
and ends exactly as an uninterrupted run. Changed bytes that still decode are caught by the state
digest saved beside each checkpoint, so a partial or altered state is never loaded silently."""
import os

import jax
import numpy as np
import pytest

from jaxtree_lora.train.loop import StopRequested

from test_loop import make_run, tiny_config


def data_files(step_dir):
    """The array chunk files of the state item (OCDBT data files: state/d and per-process ocdbt.*/d)."""
    found = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            found += [os.path.join(root, f) for f in files]
    return sorted(found, key=os.path.getsize)


def truncate(step_dir):
    for path in data_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def change_bytes(step_dir):
    for path in data_files(step_dir):
        with open(path, "r+b") as f:
            size = os.path.getsize(path)
            f.seek(size // 2)
            f.write(bytes(min(16, size - size // 2)))


def garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "loop", "metadata"), "w") as f:
        f.write("{not json")


def missing_part(step_dir):
    for path in data_files(step_dir):
        os.remove(path)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return make_run(tiny_config("treelora"), tmp_path_factory.mktemp("whole")).fit()


@pytest.mark.parametrize("damage", [change_bytes,
                                    pytest.param(garbage_metadata, marks=pytest.mark.slow),
                                    pytest.param(truncate, marks=pytest.mark.slow),
                                    pytest.param(missing_part, marks=pytest.mark.slow)],
                         ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(damage, whole, tmp_path, capfd):
    cut = make_run(tiny_config("treelora", checkpoint_every=1), tmp_path / "cut", stop_after_steps=7)
    with pytest.raises(StopRequested):
        cut.fit()
    damage(str(tmp_path / "cut" / "checkpoints" / "7"))
    capfd.readouterr()
    resumed = make_run(tiny_config("treelora", checkpoint_every=1), tmp_path / "cut").fit(resume=True)
    err = capfd.readouterr().err
    reports = [line for line in err.splitlines() if "checkpoint 7 is damaged" in line]
    assert len(reports) == 1, f"the damage was not reported in one line: {err[-1500:]}"
    np.testing.assert_array_equal(resumed["matrix"], whole["matrix"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].trainable),
                 jax.device_get(whole["state"].trainable))
