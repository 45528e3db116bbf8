"""Every PRNG key of a run, derived from the seed by named purpose.

With JAX's partitionable threefry, `split(key, n)[i] == fold_in(key, i)`, so small integer tags at
the first level would collide with the task, epoch, batch and layer indices folded in below them
(generation's tag 7 was once task 7's step-key parent). Each purpose therefore gets its own
first-level tag, a stable 32-bit hash of its name, and indices are folded in only under it:
`for_purpose(seed, "init")`, `train_step_key(seed, task, epoch, batch)`, `generation_key(...)`.
Inside a step, `derive(key, "dropout")`, `derive(key, "treelora_selection")` and the like keep a
method's own draws off the dropout masks' keys. More: docs/ARCHITECTURE.md, the JAX rules.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np

from jaxtree_lora import threefry  # the unrolled CPU lowering (same bits, faster draws); host fold_in

PURPOSES = ("init", "train", "generate")


def tag(name: str) -> int:
    """A stable uint32 tag for a purpose name: the first 4 bytes of its SHA-256 (not Python's hash(),
    which changes between processes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def derive(key: jax.Array, name: str) -> jax.Array:
    """The key of purpose `name` under `key` ([2] uint32 -> [2] uint32)."""
    return jax.random.fold_in(key, tag(name))


def for_purpose(seed: int, name: str) -> jax.Array:
    """The first-level key of a purpose ("init", "train", "generate", ...) for a run's seed (derived on
    the host where `_host_chain` can: the same bits, and no programs traced for two scalar ops)."""
    key = _host_chain(seed, name)
    if key is not None:
        return jax.device_put(key)
    return derive(jax.random.PRNGKey(int(seed)), name)


def _on_host(seed: int) -> bool:
    return (str(jax.config.jax_default_prng_impl) == "threefry2x32" and isinstance(seed, (int, np.integer))
            and 0 <= int(seed) < 2 ** 31)


def _host_chain(seed: int, name: str, *indices: int):
    """fold_in(...fold_in(for_purpose(seed, name), i0)..., in) on the host, as numpy ([2] uint32), for
    JAX's default threefry keys (the same bits: tests/test_keys.py); None for any other key type."""
    if not _on_host(seed):
        return None
    key = threefry.fold_in(np.array([0, int(seed)], np.uint32), tag(name))  # PRNGKey(seed) = [0, seed]
    for index in indices:
        key = threefry.fold_in(key, int(index))
    return key


def train_step_key(seed: int, task: int, epoch: int, batch: int):
    """The key of one optimiser step: a pure function of (seed, task, epoch, batch), so a resumed
    run draws the same keys as an uninterrupted one. Derived on the host (numpy): an eager
    `jax.random.fold_in` is a program queued behind the running step, so it would make the host wait
    for the device at every step (other key types still take that path)."""
    key = _host_chain(seed, "train", task, epoch, batch)
    if key is not None:
        return key
    key = for_purpose(seed, "train")
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, task), epoch), batch)


def generation_key(seed: int, trained_upto: int, task: int):
    """The sampling key of evaluating `task` after training up to task `trained_upto` (host-derived
    like `train_step_key`)."""
    key = _host_chain(seed, "generate", trained_upto, task)
    if key is not None:
        return key
    key = for_purpose(seed, "generate")
    return jax.random.fold_in(jax.random.fold_in(key, trained_upto), task)


def settled(draw: jax.Array) -> jax.Array:
    """A random draw kept apart from the arithmetic that uses it (`scale * settled(normal(key))`). The
    run's initial state is one jitted program (`Run.initial_state`), where XLA would otherwise fuse the
    scale into the draw's own arithmetic and round some values differently from the same draw made op
    by op; the barrier keeps the bits of both the same."""
    return jax.lax.optimization_barrier(draw)
