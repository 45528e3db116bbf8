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

import dataclasses
from typing import Callable, Iterator, Optional, Sequence

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
            start: int = 0, take: Optional[np.ndarray] = None,
            trim: Optional[Callable[[dict, np.ndarray], dict]] = None) -> Iterator[dict]:
    """Yields {name: [batch_size, ...] array} plus "weight" [batch_size] float32, from batch `start` on.

    `arrays` maps names to arrays with the same leading dimension (examples). With shuffle=False the
    rows come in their stored order (evaluation). `take` (positions within each batch) reads only those
    rows: one process's shard of a global batch (train.mesh.local_batch_rows); the order of every
    batch is the same on every process, so the shards are disjoint and together make the batch.
    `trim(arrays, rows) -> {name: column slice}` (`LengthBuckets.columns`) drops padding columns; it
    sees the whole global batch's rows, so every process cuts its shard to the same width.
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
        columns = trim(stored, chosen) if trim is not None else {}
        if take is not None:
            chosen, weight = chosen[take], weight[take]
        batch = {key: value[chosen][:, columns[key]] if key in columns else value[chosen]
                 for key, value in stored.items()}
        batch["weight"] = weight
        yield batch


# -- length buckets ------------------------------------------------------------------------------
# Text arrays padded to one width per stream: the mask that marks real tokens, the arrays cut with
# it, and the side its padding is on. Classification text is right-padded (tokenize_classification);
# instruction sequences and prompts are left-padded (answers right-aligned, generation's last prompt
# token in the last column), so they are cut from the left and keep that alignment.
RIGHT_PADDED = {"attention_mask": ("input_ids", "attention_mask", "token_type_ids")}
LEFT_PADDED = {"attention_mask": ("input_ids", "attention_mask", "loss_mask"),
               "prompt_mask": ("prompt_ids", "prompt_mask")}


def choose_buckets(lengths: np.ndarray, width: int, batch_size: int, count: int = 4,
                   multiple: int = 8) -> tuple[int, ...]:
    """At most `count` widths (ascending, multiples of `multiple`, the last covering the longest row,
    none above `width`) for batches of `batch_size` rows whose real lengths are drawn from `lengths`.

    A batch is cut to its longest row, so the widths follow the distribution of a batch's longest
    length, P(max <= x) = F(x) ** batch_size (F: the empirical distribution of `lengths`): they are
    its quantiles 1/count, 2/count, ..., 1, rounded up. Each width is one more compile of every
    jitted function fed with batches, which is why there are few.
    """
    lengths = np.sort(np.asarray(lengths, np.int64).ravel())
    if lengths.size == 0:
        return (int(width),)
    round_up = lambda value: int(min(width, -(-int(value) // multiple) * multiple))  # noqa: E731
    # Quantile q of the batch maximum is the length quantile q ** (1 / batch_size).
    levels = [(k / count) ** (1.0 / max(int(batch_size), 1)) for k in range(1, count)]
    chosen = {round_up(np.quantile(lengths, level, method="higher")) for level in levels}
    chosen.add(round_up(lengths[-1]))
    return tuple(sorted(w for w in chosen if w > 0))


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
    """Cuts each text batch to the smallest bucket width that holds its longest real row.

    groups: mask name -> (the arrays cut with it, "left" | "right" padding side, bucket widths).
    The batch's rows and order are untouched (the order stays a pure function of (seed, task,
    epoch, batch)); only all-padding columns go, so a batch computes what the full width computes
    (padding keys are masked, padding tokens weigh 0 in losses and statistics) with fewer tokens.
    Dropout masks are drawn per shape, so with dropout a cut batch draws other (equally
    distributed) masks than the full one would.
    """

    groups: dict

    @classmethod
    def for_splits(cls, splits: Sequence[dict], side: str, batch_size: int, count: int = 4) -> "LengthBuckets":
        """Buckets from every split's arrays (all tasks, train and test: one set for the stream, so
        no task brings a new shape). side: "right" (classification text) or "left" (instruction)."""
        layout = RIGHT_PADDED if side == "right" else LEFT_PADDED
        groups = {}
        for mask_name, members in layout.items():
            masks = [np.asarray(split[mask_name]) for split in splits if mask_name in split]
            if not masks:
                continue
            width = max(mask.shape[1] for mask in masks)
            lengths = np.concatenate([real_extent(mask, side) for mask in masks])
            groups[mask_name] = (members, side, choose_buckets(lengths, width, batch_size, count))
        return cls(groups)

    def columns(self, arrays: dict, rows: np.ndarray) -> dict:
        """{array name: column slice} for the batch made of `rows` of `arrays`."""
        out = {}
        for mask_name, (members, side, widths) in self.groups.items():
            if mask_name not in arrays:
                continue
            mask = arrays[mask_name][rows]
            total = mask.shape[1]
            longest = int(real_extent(mask, side).max(initial=0))
            fitting = [w for w in widths if longest <= w < total]
            if not fitting:
                continue
            keep = fitting[0]
            cut = slice(total - keep, total) if side == "left" else slice(0, keep)
            out.update({name: cut for name in members if name in arrays})
        return out

    def batches(self, arrays: dict, batch_size: int, **kwargs) -> Iterator[dict]:
        """`batches` with each batch cut to its bucket."""
        return batches(arrays, batch_size, trim=self.columns, **kwargs)

    @staticmethod
    def num_batches(rows: int, batch_size: int) -> int:
        return num_batches(rows, batch_size)

    def widths(self) -> dict:
        """{mask name: bucket widths}: how many shapes (compiles) each jitted function can see."""
        return {name: widths for name, (_, _, widths) in self.groups.items()}


def real_extent(mask: np.ndarray, side: str) -> np.ndarray:
    """[N] columns each row needs: up to its last real token (right padding) or from its first one
    (left padding). 0 for a row without real tokens. mask: [N, T]."""
    mask = np.asarray(mask) > 0
    if mask.shape[1] == 0:
        return np.zeros((mask.shape[0],), np.int64)
    has = mask.any(axis=1)
    if side == "left":
        return np.where(has, mask.shape[1] - np.argmax(mask, axis=1), 0)
    return np.where(has, mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
