"""Every PRNG key of a run, derived from the seed by named purpose.

Why a module: with JAX's partitionable threefry (the default), `split(key, n)[i] == fold_in(key, i)`,
and `nnx.Rngs(seed)` draws `fold_in(PRNGKey(seed), 0)`. Small integer tags at the first level
therefore collide with the task, epoch, batch and layer indices folded in below them: before this
module, `fold_in(base, 7)` (generation) was task 7's step-key parent and `fold_in(base, 1)`
(initialisation) was task 1's. Here each purpose has its own first-level tag, a stable 32-bit hash
of its name, so it cannot equal a small index, and the indices are folded in only under it:

    for_purpose(seed, "init")                                  adapters and head at the start
    train_step_key(seed, task, epoch, batch)                   fold_in chain under "train"
    generation_key(seed, trained_upto, task)                   fold_in chain under "generate"

Inside one step the key is split the same way: `derive(key, "dropout")` for the backbone's adapter
dropout, `derive(key, "loda_lookahead")`, `derive(key, "treelora_selection")`, so a method's own
draws never reuse a dropout mask's key (layer indices are small integers too).
"""
from __future__ import annotations

import hashlib

import jax

PURPOSES = ("init", "train", "generate")


def tag(name: str) -> int:
    """A stable uint32 tag for a purpose name: the first 4 bytes of its SHA-256 (not Python's hash(),
    which changes between processes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def derive(key: jax.Array, name: str) -> jax.Array:
    """The key of purpose `name` under `key` ([2] uint32 -> [2] uint32)."""
    return jax.random.fold_in(key, tag(name))


def for_purpose(seed: int, name: str) -> jax.Array:
    """The first-level key of a purpose ("init", "train", "generate", ...) for a run's seed."""
    return derive(jax.random.PRNGKey(int(seed)), name)


def train_step_key(seed: int, task: int, epoch: int, batch: int) -> jax.Array:
    """The key of one optimiser step: a pure function of (seed, task, epoch, batch), so a resumed
    run draws the same keys as an uninterrupted one."""
    key = for_purpose(seed, "train")
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, task), epoch), batch)


def generation_key(seed: int, trained_upto: int, task: int) -> jax.Array:
    """The sampling key of evaluating `task` after training up to task `trained_upto`."""
    key = for_purpose(seed, "generate")
    return jax.random.fold_in(jax.random.fold_in(key, trained_upto), task)
