"""Orbax checkpoints of the whole continual state.

Two items per checkpoint, saved together under one step number (the global optimiser step):

- `state`: the `TrainState` pytree (adapters, head, optimiser state, method state: for TreeLoRA the
  bank of task vectors, the tree arrays and the bandit statistics) and the run's base PRNG key;
- `loop`: JSON with the loop position (task, epoch, next batch), the accuracy matrix so far, the
  timings and the config fingerprint.

The frozen backbone is never saved: it is reloaded from its source. Saves are asynchronous; `wait()`
blocks until the last one is on disk. Orbax writes to a temporary directory and renames it when the
save is complete, so an interrupted save never shows up as a checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtree_lora.faults import kill_point


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"  # in the path of Orbax's own files


def _orbax_error_reported_by_caller(record: logging.LogRecord) -> bool:
    """Logging filter: drops Orbax's own ERROR records (with their tracebacks: a failed background
    write logs one before the failure reaches `save`/`wait`), since that same failure is raised to
    the caller here and reported there, in one line. Everything else is logged as before."""
    return not (record.levelno >= logging.ERROR and _ORBAX_SOURCE in (record.pathname or ""))


def _from_orbax(traceback) -> bool:
    while traceback is not None:
        if _ORBAX_SOURCE in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _orbax_task_never_retrieved(record: logging.LogRecord) -> bool:
    """Logging filter for asyncio: when one background write fails, Orbax raises the first failure
    and leaves its sibling writes' failures (the same full disk) in tasks nobody awaits; asyncio logs
    each as 'Task exception was never retrieved' when the task is collected, which depends on timing.
    Those records (raised inside Orbax) are dropped; the failure reaches the caller once."""
    exc_info = record.exc_info
    return not (record.levelno >= logging.ERROR and exc_info and exc_info[2] is not None
                and _from_orbax(exc_info[2]))


logging.getLogger("absl").addFilter(_orbax_error_reported_by_caller)
logging.getLogger("asyncio").addFilter(_orbax_task_never_retrieved)


def _closed_loop_echo(kind, value) -> bool:
    return kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_closed_loop_callbacks(hook):
    """sys.excepthook wrapper: after a failed write Orbax closes its event loop while TensorStore's
    other writes still finish and call back into it; each prints an 'Event loop is closed' traceback
    from a native thread. The failure itself is reported by `save`/`wait`: those echoes are dropped,
    every other exception goes to the previous hook."""
    def excepthook(kind, value, traceback):
        if not _closed_loop_echo(kind, value):
            hook(kind, value, traceback)

    return excepthook


def _quiet_closed_loop_unraisable(hook):
    """The same echoes reach sys.unraisablehook when TensorStore's native thread reports the callback
    as unraisable (which of the two paths it takes depends on timing): dropped there too."""
    def unraisablehook(unraisable):
        if not _closed_loop_echo(unraisable.exc_type, unraisable.exc_value):
            hook(unraisable)

    return unraisablehook


sys.excepthook = _quiet_closed_loop_callbacks(sys.excepthook)
sys.unraisablehook = _quiet_closed_loop_unraisable(sys.unraisablehook)


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run (different model, method or stream)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only directory, ...). Orbax writes into a
    temporary directory and renames it only when complete, so earlier checkpoints are untouched."""


def _write_failed(step: int, error: BaseException, directory: str, previous) -> CheckpointWriteError:
    kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None else "no earlier checkpoint exists"
    return CheckpointWriteError(
        f"writing the checkpoint of step {step} to {directory} failed ({type(error).__name__}: {error}); "
        f"{kept}: free disk space or make the directory writable, then continue with --resume")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, keep_task_ends: bool = True):
        self.directory = os.path.abspath(directory)
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        self._task_end_steps: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "loop"))
        self._last_good = self.manager.latest_step()  # the newest checkpoint known to be complete
        self._pending: Optional[int] = None

    def save(self, step: int, state: Any, loop: dict, force: bool = True) -> None:
        """Saves (asynchronously). A later save at the same step (the end-of-task save right after a
        periodic one) replaces the earlier checkpoint."""
        self.wait()  # the previous asynchronous save: its failure surfaces here, its success is recorded
        previous = self._last_good
        try:
            if step in self.manager.all_steps():
                self.manager.wait_until_finished()
                self.manager.delete(step)
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             loop=ocp.args.JsonSave(loop)), force=force)
        except Exception as error:  # an async write failing earlier surfaces here too
            raise _write_failed(step, error, self.directory, previous) from error
        self._pending = step
        kill_point("checkpoint")

    def latest(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
        """Restores (state, loop, step) from `step` (default: the newest)."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
        return restored["state"], restored["loop"], step

    def restore_loop(self, step: Optional[int] = None) -> dict:
        step = self.latest() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
        return restored["loop"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise _write_failed(self._pending, error, self.directory, self._last_good) from error
        if self._pending is not None:
            self._last_good = self._pending

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def state_digest(state) -> str:
    """sha256 over every array of the state (tree order, dtype, shape and bytes): saved beside each
    checkpoint and checked on restore, so changed bytes are never loaded silently."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def restore_newest_good(checkpoints: Checkpointer, state, fingerprint: str) -> tuple[Any, dict]:
    """(state, loop) of the newest checkpoint that reads back whole and matches its `state_digest`,
    shaped like `state`; a damaged one is reported on stderr and skipped. A checkpoint of another
    config (`fingerprint`), or none readable, fails in one line naming the fix."""
    for step in sorted(checkpoints.steps(), reverse=True):
        try:
            loop = checkpoints.restore_loop(step)
        except Exception as error:
            print(f"jaxtree-lora: checkpoint {step} is damaged ({type(error).__name__}); trying an older one",
                  file=sys.stderr)
            continue
        if loop.get("fingerprint") != fingerprint:
            raise CheckpointMismatch(
                f"the checkpoint in {checkpoints.directory} was written by a different config (model, method, "
                f"LoRA, data, training or optimiser changed): use a new --workdir or the original config")
        try:
            restored, loop, _ = checkpoints.restore(abstract(state), step)
        except Exception as error:
            print(f"jaxtree-lora: checkpoint {step} is damaged ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120]}); trying an older one", file=sys.stderr)
            continue
        if loop.get("state_digest") not in (None, state_digest(restored)):
            # The arrays read back but are not the ones written (bytes changed on disk).
            print(f"jaxtree-lora: checkpoint {step} is damaged (its arrays do not match the digest "
                  f"saved with them); trying an older one", file=sys.stderr)
            continue
        return restored, loop
    raise CheckpointMismatch(
        f"no readable checkpoint in {checkpoints.directory}: every one is damaged; start again with a new --workdir")
