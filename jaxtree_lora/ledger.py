"""Where a run's wall time goes: a host-side ledger of named phases whose parts sum to the wall.

Every second from the interpreter's start to `table()` belongs to exactly one line: "startup" before the
first ledger existed (interpreter, imports, config), the innermost phase open at that moment
(`with ledger.phase("evaluation"): ...`), "compile" for tracing, lowering and XLA compilation (or
loading a compiled program from the persistent cache) that jax.monitoring reports while a phase runs
(taken out of that phase), and "other" for time outside every phase. Phases are host wall-clock
spans, outside jit: with asynchronous dispatch, device work is counted in the phase that waits for it
(the loop blocks at each task's end, so training's device time stays in "train").
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

# Trace, lower to MLIR, XLA compile or persistent-cache load (jax/_src/dispatch.py's event names).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_startup_claimed = False  # only the first ledger of a process counts the start-up before it


# The wall clock and the process's CPU seconds when this module was imported (the package imports it
# first, `jaxtree_lora/__init__.py`).
_IMPORTED = (time.time(), time.process_time())


def process_age_seconds() -> float:
    """Seconds since this process's interpreter started: the wall time since the package was first
    imported plus the CPU seconds the process had spent before that (the interpreter's start and its
    first imports, on one thread). The process's creation time is not used: a shell that `exec`s its
    last command (`bash -c "pip install ... && jaxtree-lora run"`) hands its own age, the install
    included, to the interpreter."""
    imported_at, cpu_before = _IMPORTED
    return max(time.time() - imported_at, 0.0) + cpu_before


def _union_length(spans: list) -> float:
    """Length of the union of (start, end) intervals (nested compile events would count twice)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class Ledger:
    """Named wall-clock phases of one run (see the module docstring). `since_process_start`: the first
    ledger of the process also counts the time before it ("startup")."""

    def __init__(self, since_process_start: bool = True):
        global _startup_claimed
        now = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        startup = 0.0
        if since_process_start and not _startup_claimed:
            startup = process_age_seconds()
            _startup_claimed = True
        self._origin = now - startup
        if startup > 0:
            self.seconds["startup"] = startup
        self._stack: list[str] = []
        self._segment_start = now
        self._spans: list = []
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._listening = False
        try:
            import jax.monitoring

            jax.monitoring.register_event_time_span_listener(self._on_span)
            self._listening = True
        except Exception:  # an older jax: compile time stays inside the phase that triggered it
            pass

    def _on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
            with self._lock:
                self._spans.append((start, end))

    def _credit(self) -> float:
        """Books the time since the last change to the open phase ("other" when none), compile apart;
        returns the moment booked up to (perf_counter)."""
        now = time.perf_counter()
        elapsed = now - self._segment_start
        with self._lock:
            compiled = min(_union_length(self._spans), elapsed)
            self._spans = []
        name = self._stack[-1] if self._stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - compiled
        if compiled > 0:
            self.seconds["compile"] = self.seconds.get("compile", 0.0) + compiled
        self._segment_start = now
        return now

    @contextlib.contextmanager
    def phase(self, name: str):
        """Counts the time inside the block (less inner phases and compilation) under `name`."""
        self._credit()
        self._stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            yield self
        finally:
            self._credit()
            self._stack.pop()

    @property
    def current(self) -> str:
        """The innermost open phase ("other" outside every phase)."""
        return self._stack[-1] if self._stack else "other"

    def timed(self, name: str, iterator) -> Iterator:
        """`iterator` with the time of each of its steps (not of the loop body using it) under `name`."""
        iterator = iter(iterator)
        while True:
            with self.phase(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def table(self) -> dict:
        """{"wall_seconds", "phases": {name: seconds} (largest first, "other" last), "calls",
        "process_cpu_seconds"}: the phases sum to the wall."""
        wall = self._credit() - self._origin
        phases = {name: seconds for name, seconds in sorted(self.seconds.items(), key=lambda item: -item[1])
                  if name != "other"}
        phases["other"] = self.seconds.get("other", 0.0)
        # CPU seconds of the whole process (all threads, from its start): on a shared machine the wall
        # stretches with other load, this much less.
        return {"wall_seconds": wall, "phases": phases, "calls": dict(self.calls),
                "process_cpu_seconds": time.process_time()}

    def close(self) -> None:
        if self._listening:
            import jax.monitoring

            jax.monitoring.unregister_event_time_span_listener(self._on_span)
            self._listening = False


def format_table(table: dict) -> str:
    """The ledger as text: one line per phase with its seconds and share of the wall."""
    wall = max(float(table["wall_seconds"]), 1e-9)
    width = max(len(name) for name in table["phases"]) if table["phases"] else 5
    lines = [f"time (s){'':<{max(width - 8, 0)}}   seconds   share"]
    for name, seconds in table["phases"].items():
        lines.append(f"{name:<{width}}  {seconds:8.1f}  {100 * seconds / wall:5.1f}%")
    lines.append(f"{'wall':<{width}}  {wall:8.1f}")
    if "process_cpu_seconds" in table:
        lines.append(f"{'(process CPU)':<{width}}  {float(table['process_cpu_seconds']):8.1f}")
    if table.get("note"):
        lines.append(table["note"])
    return "\n".join(lines)


class NullLedger:
    """A ledger that records nothing (a Run built without one)."""

    def phase(self, name: str):
        return contextlib.nullcontext(self)

    def timed(self, name: str, iterator):
        return iterator


def null() -> NullLedger:
    return NullLedger()
