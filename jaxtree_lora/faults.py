"""Named fault points for the kill-anywhere tests.

`JAXTREE_LORA_KILL_AT=POINT:N` makes the process SIGKILL itself the N-th time it passes `POINT`
(1-based), so a test can land a kill exactly inside a step, during evaluation or while a checkpoint
is being written, instead of hoping a timer does. Points:

  "step"        a train step has been dispatched and its update not yet logged or saved
  "evaluation"  one evaluation batch of a task has been scored, the rest of the task's have not
  "checkpoint"  an asynchronous checkpoint write has started and not yet been committed

Unset (always, outside tests), `kill_point` is a dictionary lookup and nothing else.
"""
from __future__ import annotations

import os
import signal

ENV = "JAXTREE_LORA_KILL_AT"
POINTS = ("step", "evaluation", "checkpoint")


def _parse(value: str | None):
    if not value:
        return None
    point, _, count = value.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV}={value!r}: expected POINT:N with POINT one of {', '.join(POINTS)} and N >= 1")
    return point, int(count)


_target = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILLs this process if `point` is the armed one and this is its N-th passage."""
    if _target is None or _target[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
