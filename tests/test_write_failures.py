"""A checkpoint that cannot be written (disk full, read-only directory) stops the run with one line
naming the fix, exit status 2, and the previous checkpoint intact and loadable."""
import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtree_lora import checkpoint as checkpoint_lib
from jaxtree_lora.checkpoint import CheckpointWriteError

from test_bert import make_checkpoint
from test_data_files import rows, write_csv
from test_loop import make_run, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def write_stream(directory) -> list:
    """A tiny BERT checkpoint and a CSV stream of 2 tasks (4 steps each at batch 8): the CLI's arguments."""
    make_checkpoint(str(directory / "bert"))
    train = write_csv(directory / "train.csv", rows(classes=4, per_class=16, seed=0))
    test = write_csv(directory / "test.csv", rows(classes=4, per_class=4, seed=1))
    return ["--no-progress", "--config.model.name=hf", "--config.model.kind=encoder",
            f"--config.model.path={directory / 'bert'}", "--config.data.max_len=12", "--config.data.name=files",
            f"--config.data.train={train}", f"--config.data.test={test}", "--config.data.num_tasks=2",
            "--config.method.name=seqlora", "--config.train.epochs=1", "--config.train.batch_size=8",
            "--config.eval.batch_size=64", "--config.train.checkpoint_every=1"]


# The child caps its own file size before the CLI starts (no preexec_fn: forking a process that runs
# JAX threads may deadlock); SIGXFSZ ignored, so a write past the cap fails with EFBIG as on a full disk.
LIMITED = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from jaxtree_lora import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def cli(argv, file_size_limit=resource.RLIM_INFINITY, **environment):
    """The real command line in a child process; `file_size_limit` (bytes) caps every file it writes."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(file_size_limit), "run", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAXTREE_LORA_XLA_CACHE": "off", **environment})


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run killed (SIGKILL) at its 7th step with a checkpoint after every step: checkpoints on disk,
    the run unfinished. Each test resumes a copy of it."""
    directory = tmp_path_factory.mktemp("interrupted")
    argv = write_stream(directory) + ["--workdir", str(directory / "run")]
    out = cli(argv, JAXTREE_LORA_KILL_AT="step:7")
    assert out.returncode == -signal.SIGKILL, f"the run was to be killed at step 7: exit {out.returncode}\n{out.stderr[-2000:]}"
    # The kill's unfinished write (Orbax's *.orbax-checkpoint-tmp): removed, so that the resumed run's
    # stderr holds only what it says itself (Orbax warns when it clears one).
    for name in os.listdir(directory / "run" / "checkpoints"):
        if name.endswith(".orbax-checkpoint-tmp"):
            shutil.rmtree(directory / "run" / "checkpoints" / name)
    checkpoints = checkpoint_lib.Checkpointer(str(directory / "run" / "checkpoints"))
    latest = checkpoints.latest()
    checkpoints.close()
    assert latest is not None and latest >= 4, "the interrupted run left no checkpoint to resume"
    return directory, argv, latest


def resumable_copy(interrupted, tmp_path):
    directory, argv, latest = interrupted
    shutil.copytree(directory / "run", tmp_path / "run")
    return [*argv[:-1], str(tmp_path / "run"), "--resume"], tmp_path / "run" / "checkpoints", latest


def assert_one_line_naming_the_fix(out, latest, cause):
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{out.stderr[-3000:]}"
    assert lines[0].startswith(f"jaxtree-lora: error: writing the checkpoint of step {latest + 1} ")
    assert cause in lines[0], f"the cause ({cause}) is not named: {lines[0]}"
    assert f"the previous checkpoint (step {latest}) is intact" in lines[0] and "--resume" in lines[0]


@pytest.mark.slow  # ~30 s on 2 idle cores: two command-line runs (the interrupted one and its resume)
def test_a_full_disk_stops_the_cli_in_one_line_and_keeps_the_previous_checkpoint(interrupted, tmp_path):
    """The resumed run's first checkpoint cannot be written (every file capped at 8 KiB: the state's
    array file is ~10 KiB, metrics.jsonl and the JSON items stay under it)."""
    argv, checkpoints_directory, latest = resumable_copy(interrupted, tmp_path)
    before = sorted(os.listdir(checkpoints_directory))
    out = cli(argv, file_size_limit=8192)
    assert_one_line_naming_the_fix(out, latest, "File too large")
    checkpoints = checkpoint_lib.Checkpointer(str(checkpoints_directory))
    try:
        assert checkpoints.latest() == latest, "the failed write replaced or hid the previous checkpoint"
        assert set(before) <= set(os.listdir(checkpoints_directory)), "a previous checkpoint was removed"
        loop = checkpoints.restore_loop(latest)
        assert loop["position"]["task"] == 1, "the previous checkpoint's loop item loads whole (task 2 under way)"
    finally:
        checkpoints.close()
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (and an immutable directory, "
                    "chattr +i, makes Orbax retry for minutes before it fails)")
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


def test_a_sibling_write_failure_left_in_an_unawaited_task_is_not_logged(caplog):
    """When one of Orbax's background writes fails, its siblings fail on the same full disk inside
    tasks nobody awaits; asyncio logs each one ('Task exception was never retrieved') whenever the task
    is collected, which made the CLI's one-line error a seven-line one by chance. The filter drops
    those (raised in Orbax's code) and keeps every other task's report."""
    import asyncio
    import gc

    namespace = {}
    for name, path in (("orbax_write", os.path.join(os.sep, "site-packages", "orbax", "serialization.py")),
                       ("user_write", os.path.join(os.sep, "project", "writer.py"))):
        exec(compile(f"async def {name}():\n    raise OSError(27, 'File too large')\n", path, "exec"), namespace)
    for name in ("orbax_write", "user_write"):
        loop = asyncio.new_event_loop()
        task = loop.create_task(namespace[name]())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()
    reported = [record.getMessage() + caplog.handler.format(record) for record in caplog.records
                if record.name == "asyncio"]
    assert len(reported) == 1 and "never retrieved" in reported[0], reported  # the user's own task still is
    assert "writer.py" in reported[0] and "serialization.py" not in reported[0], reported
