"""Fixed-shape batches whose order is a pure function of (seed, task, epoch).

Every batch has exactly `batch_size` rows: the last one is completed by repeating rows and carries
"weight" [B] (1 for real rows, 0 for padding), so one compiled step serves every batch. Because the
order depends only on (seed, task, epoch), a run resumed at batch `start` sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def num_batches(rows: int, batch_size: int) -> int:
    return max(int(np.ceil(rows / batch_size)), 1) if rows else 0


def order(rows: int, *, seed: int, task: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(rows)
    generator = np.random.default_rng([int(seed), int(task), int(epoch), 0x5EED])
    return generator.permutation(rows)


def batches(arrays: dict, batch_size: int, *, seed: int, task: int, epoch: int, shuffle: bool = True,
            start: int = 0) -> Iterator[dict]:
    """Yields dicts of [batch_size, ...] numpy arrays plus "weight", from batch index `start` on."""
    rows = len(next(iter(arrays.values())))
    if rows == 0:
        return
    index = order(rows, seed=seed, task=task, epoch=epoch, shuffle=shuffle)
    for number in range(start, num_batches(rows, batch_size)):
        chosen = index[number * batch_size:(number + 1) * batch_size]
        real = len(chosen)
        if real < batch_size:
            chosen = np.concatenate([chosen, np.resize(index, batch_size - real)])
        batch = {key: np.asarray(value)[chosen] for key, value in arrays.items()}
        weight = np.zeros((batch_size,), np.float32)
        weight[:real] = 1.0
        batch["weight"] = weight
        yield batch
