"""Threefry-2x32 on CPU as straight-line code: the same bits as JAX's, in a fraction of the time.

JAX lowers its threefry2x32 primitive on CPU as a `fori_loop` over the hash's five round groups
(shorter programs to compile); XLA CPU then runs that loop with two full copies of the counter arrays
per trip, so a dropout mask or a batch of Gaussian samples costs several times the arithmetic. Other
platforms get the unrolled form. Importing this module registers an unrolled CPU lowering, written
from the Threefry-2x32 specification (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; 20 rounds, key injection every 4): same primitive, same bits, so every draw of every run is
unchanged (tests/test_threefry.py). Measured: BENCHMARKS.md, "Threefry on CPU".
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

try:
    from jax.extend.random import threefry2x32_p
    from jax.interpreters import mlir
except ImportError:  # a jax without these public names: its own lowering stays (same bits, slower)
    threefry2x32_p = mlir = None

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # rounds 1-4, 9-12, 17-20 and 5-8, 13-16
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, bits: int):
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key1, key2, x1, x2):
    """Threefry-2x32 of counters (x1, x2) under key (key1, key2), all uint32 and broadcastable: five
    groups of four rounds (add, rotate, xor), each group followed by the injection of the next key word
    pair and the group's index. All numpy: computed on the host (no program dispatched)."""
    xp = np if all(isinstance(v, (np.ndarray, np.generic)) for v in (key1, key2, x1, x2)) else jnp
    shape = xp.broadcast_shapes(*(xp.shape(v) for v in (key1, key2, x1, x2)))
    keys = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for group in range(5):
        for bits in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, bits) ^ x1
        x1 = x1 + keys[(group + 1) % 3]
        x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return xp.broadcast_to(x1, shape), xp.broadcast_to(x2, shape)


def fold_in(key: np.ndarray, data: int) -> np.ndarray:
    """`jax.random.fold_in` of a raw threefry key ([2] uint32) and a 32-bit integer, on the host: the
    key hashes the counter pair (0, data) (JAX's `threefry_seed` of a 32-bit value is [0, value])."""
    with np.errstate(over="ignore"):
        x1, x2 = threefry2x32(np.uint32(key[0]), np.uint32(key[1]), np.uint32(0), np.uint32(data & 0xFFFFFFFF))
    return np.array([x1, x2], np.uint32)


if threefry2x32_p is not None:
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(threefry2x32, multiple_results=True), platform="cpu")
