"""Fixed-shape batches whose order is a pure function of (seed, task, epoch).

Every batch has exactly `batch_size` rows: the last one is completed by repeating rows of the same
epoch's order and carries "weight" [batch_size] float32 (1 for real rows, 0 for padding), so one
compiled step serves every batch of every task. Because the order depends only on (seed, task,
epoch), a run resumed at batch `start` sees exactly the batches an uninterrupted run would.

    >>> import numpy as np
    >>> [b["weight"].tolist() for b in batches({"x": np.arange(5)}, 4, seed=0, task=0, epoch=0)]
    [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from jaxtree_lora.data.stream import DataError


def num_batches(rows: int, batch_size: int) -> int:
    """Batches in one epoch over `rows` examples (the last one padded): ceil(rows / batch_size)."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be >= 1: set train.batch_size (or eval.batch_size)")
    return -(-int(rows) // int(batch_size))


def order(rows: int, *, seed: int, task: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """[rows] int: the epoch's row order, a permutation seeded by (seed, task, epoch) only."""
    if not shuffle:
        return np.arange(rows)
    generator = np.random.default_rng([int(seed), int(task), int(epoch), 0x5EED])
    return generator.permutation(rows)


def batches(arrays: dict, batch_size: int, *, seed: int, task: int, epoch: int, shuffle: bool = True,
            start: int = 0, take: Optional[np.ndarray] = None) -> Iterator[dict]:
    """Yields {name: [batch_size, ...] array} plus "weight" [batch_size] float32, from batch `start` on.

    `arrays` maps names to arrays with the same leading dimension (examples). With shuffle=False the
    rows come in their stored order (evaluation). `take` (positions within each batch) reads only those
    rows: one process's shard of a global batch (train.mesh.local_batch_rows); the order of every
    batch is the same on every process, so the shards are disjoint and together make the batch.
    """
    if not arrays:
        raise DataError("no arrays to batch: the split is empty")
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"arrays of one split must have the same number of rows, got {lengths}")
    rows = next(iter(lengths.values()))
    total = num_batches(rows, batch_size)
    if rows == 0:
        return
    index = order(rows, seed=seed, task=task, epoch=epoch, shuffle=shuffle)
    stored = {key: np.asarray(value) for key, value in arrays.items()}
    for number in range(max(int(start), 0), total):
        chosen = index[number * batch_size:(number + 1) * batch_size]
        real = len(chosen)
        if real < batch_size:
            # Repeating rows of this epoch keeps padding a pure function of (seed, task, epoch).
            chosen = np.concatenate([chosen, np.resize(index, batch_size - real)])
        weight = np.zeros((batch_size,), np.float32)
        weight[:real] = 1.0
        if take is not None:
            chosen, weight = chosen[take], weight[take]
        batch = {key: value[chosen] for key, value in stored.items()}
        batch["weight"] = weight
        yield batch
