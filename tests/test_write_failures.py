"""A checkpoint that cannot be written (disk full, read-only directory) stops the run with one line
naming the fix, exit status 2, and the previous checkpoint intact and loadable."""
import errno
import os
import stat

import jax
import numpy as np
import pytest

from jaxtree_lora import checkpoint as checkpoint_lib
from jaxtree_lora.checkpoint import CheckpointWriteError

from test_loop import make_run, tiny_config


def test_disk_full_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = make_run(tiny_config("treelora", checkpoint_every=1), tmp_path / "run")
    original = checkpoint_lib.ocp.CheckpointManager.save
    calls = []

    def failing_save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"step 3 .*No space left.*previous checkpoint \(step 2\) is intact"):
        run.fit()
    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", original)
    checkpoints = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert checkpoints.latest() == 2
    state, loop, step = checkpoints.restore(checkpoint_lib.abstract(run.initial_state()))
    checkpoints.close()
    assert step == 2 and loop["position"]["batch"] >= 1, "the previous checkpoint loads whole"
    assert np.all(np.isfinite(jax.tree.leaves(jax.device_get(state.trainable))[0]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_directory_stops_cleanly(tmp_path):
    run = make_run(tiny_config("treelora", checkpoint_every=1), tmp_path / "run")
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises((CheckpointWriteError, PermissionError)):
            run.fit()
    finally:
        directory.chmod(stat.S_IRWXU)


def test_the_cli_reports_a_failed_write_in_one_line(tmp_path, monkeypatch, capsys):
    from jaxtree_lora import cli

    def broken(self, step, state, loop, force=True):
        raise checkpoint_lib._write_failed(step, OSError(errno.ENOSPC, "No space left on device"),
                                           self.directory, None)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", broken)
    config = tmp_path / "tiny.py"
    config.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_loop import tiny_config\n\n\n"
                      "def get_config(arg=''):\n    return tiny_config('seqlora')\n" % os.path.dirname(__file__))
    # The tiny config's synthetic stream is a test fixture, so drive Run directly through run_one's path:
    run = make_run(tiny_config("seqlora"), tmp_path / "cli")
    monkeypatch.setattr(cli, "run_one", lambda *a, **k: run.fit())
    status = cli.main(["run", "--config", str(config), "--workdir", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "No space left" in err and "--resume" in err
