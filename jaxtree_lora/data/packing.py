"""Sequence packing for encoder classification batches: several short texts share one row.

Short texts padded to a common length waste most of a batch on padding. Packing lays the examples
end to end in rows twice as wide, first fit in batch order, with per-token positions and segment
ids; the encoder attends and pools within each segment (`models.bert`), so the features equal the
padded batch's up to floating-point order. The row count is rounded up to one of a few choices, so
the train step compiles at most once per choice. Packing is a pure function of the batch (a resumed
run packs the same rows). The arrays and their shapes: docs/DATA.md.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def row_choices(batch_size: int, count: int = 4) -> tuple[int, ...]:
    """Row counts a packed micro-batch of `batch_size` examples is rounded up to: `count` even steps up
    to batch_size (every example alone in its row always fits)."""
    step = max(-(-int(batch_size) // int(count)), 1)
    return tuple(sorted({min(step * k, int(batch_size)) for k in range(1, int(count) + 1)} | {int(batch_size)}))


def first_fit(lengths: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row [B], start [B], rows used): each example in order goes to the first row with room."""
    free: list[int] = []
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    for index, length in enumerate(lengths):
        length = int(length)
        for candidate, room in enumerate(free):
            if room >= length:
                row[index], start[index] = candidate, width - room
                free[candidate] -= length
                break
        else:
            row[index], start[index] = len(free), 0
            free.append(width - length)
    return row, start, len(free)


def pack(batch: dict, rows: int, width: int = 0) -> dict:
    """A right-padded batch (attention_mask marks each row's real tokens, all at the front) packed into
    `rows` rows of `width` (default: the batch's width). `rows` must hold the first-fit layout
    (`rows_needed`)."""
    mask = np.asarray(batch["attention_mask"])
    examples = mask.shape[0]
    width = int(width) or mask.shape[1]
    if width < mask.shape[1] and mask[:, width:].any():
        raise ValueError(f"a text is longer than the packed width {width}")
    lengths = mask.sum(axis=1).astype(np.int64)
    row, start, used = first_fit(lengths, width)
    if used > rows:
        raise ValueError(f"{used} rows are needed to pack this batch, {rows} were given")
    out = {key: value for key, value in batch.items() if key not in TOKEN_KEYS}
    tokens = {key: np.asarray(batch[key]) for key in TOKEN_KEYS if key in batch}
    for key, value in tokens.items():
        out[key] = np.zeros((rows, width), value.dtype)
    out["position_ids"] = np.zeros((rows, width), np.int32)
    out["segment_ids"] = np.zeros((rows, width), np.int32)
    for index in range(examples):
        length, r, s = int(lengths[index]), int(row[index]), int(start[index])
        for key, value in tokens.items():
            out[key][r, s:s + length] = value[index, :length]
        out["position_ids"][r, s:s + length] = np.arange(length)
        out["segment_ids"][r, s:s + length] = index + 1
    out["examples"] = np.arange(1, examples + 1, dtype=np.int32)
    return out


def right_padded(mask) -> bool:
    """Whether every row's real tokens (mask > 0) sit at its front, as `pack` needs."""
    mask = np.asarray(mask)
    return mask.ndim == 2 and bool(np.array_equal(mask > 0, np.arange(mask.shape[1])[None, :] < mask.sum(1)[:, None]))


def rows_needed(batch: dict, width: int = 0) -> int:
    mask = np.asarray(batch["attention_mask"])
    return first_fit(mask.sum(axis=1), int(width) or mask.shape[1])[2]


# A row count the train step sees costs one trace, lowering and compile: about as much as this many
# packed rows of training (rows x steps) with the compilation cache filled (MiniLM: 0.65 s against
# 0.05 s a row-step; an empty cache's compile is 3.9 s). `plan_rows` merges a rarer count into the next
# one when that pads fewer rows over the whole stream.
MERGE_ROW_STEPS = 16


def plan_rows(needs: dict, merge_row_steps: int = MERGE_ROW_STEPS) -> tuple[int, ...]:
    """The row counts to compile for, from {rows needed: how many batches need them} (every packed
    training step of a stream; `train.plan.evaluation_tails`: every split's last evaluation batch):
    counts are grouped from the smallest up, a group raised to the next count while the rows that adds
    (batches x rows, over the group) stay within `merge_row_steps`; each group's largest count is a
    choice, so every batch fits its choice."""
    choices, group = [], []
    for rows, steps in sorted((int(r), int(s)) for r, s in needs.items()):
        if group and sum(n * (rows - r) for r, n in group) > merge_row_steps:
            choices.append(group[-1][0])
            group = []
        group.append((rows, steps))
    return tuple(choices + [group[-1][0]]) if group else ()


class Packer:
    """Packs each training batch of `accumulation` micro-batches of `micro_batch` examples into rows
    twice the batch's width: every micro-batch gets the same row count (the smallest choice holding the
    fullest one), so the packed batch reshapes to [accumulation, rows, ...] like an unpacked one to
    [accumulation, micro_batch, ...]. `planned`: the stream's row counts (`plan_rows`); a batch needing
    more than the largest takes the next of the 8 even steps up to half the micro-batch."""

    def __init__(self, micro_batch: int, accumulation: int = 1, planned: Sequence[int] = ()):
        self.micro_batch, self.accumulation = int(micro_batch), int(accumulation)
        self.planned = tuple(sorted(set(int(rows) for rows in planned)))
        self.choices = self.planned + row_choices(-(-self.micro_batch // 2), 8)

    def rows(self, batch: dict) -> int:
        """The packed row count `batch` needs (its fullest micro-batch's first-fit rows)."""
        mask = np.asarray(batch["attention_mask"])
        parts = (mask[i * self.micro_batch:(i + 1) * self.micro_batch] for i in range(self.accumulation))
        return max(rows_needed({"attention_mask": part}, 2 * mask.shape[1]) for part in parts)

    def __call__(self, batch: dict) -> dict:
        micro = [{key: np.asarray(value)[i * self.micro_batch:(i + 1) * self.micro_batch]
                  for key, value in batch.items()} for i in range(self.accumulation)]
        width = 2 * np.asarray(batch["attention_mask"]).shape[1]
        need = self.rows(batch)
        rows = next(choice for choice in self.choices if choice >= need)
        packed = [pack(part, rows, width) for part in micro]
        return {key: np.concatenate([part[key] for part in packed], axis=0) for key in packed[0]}


class FeaturePacker:
    """Packs the batches of forwards that only take features (evaluation, the statistics and feature
    passes): one feature row per example, as from the padded batch up to floating-point order. Rows
    twice the batch's width; the row count rounded up to one of `count` choices up to half the batch
    (every pair of texts fits a row), so each compiled forward sees a few shapes. A batch that is
    already packed, has no attention mask, is not right-padded, or would keep more than `keep` of its
    token slots (long texts: rows twice as wide only double attention's cost) passes through unchanged."""

    def __init__(self, count: int = 4, keep: float = 0.75):
        self.count, self.keep = int(count), float(keep)

    def __call__(self, batch: dict) -> dict:
        mask = batch.get("attention_mask")
        if mask is None or "segment_ids" in batch or not right_padded(mask):
            return batch
        examples, columns = np.asarray(mask).shape
        need = rows_needed(batch, 2 * columns)
        rows = next(choice for choice in row_choices(-(-examples // 2), self.count) + (need,) if choice >= need)
        if rows * 2 * columns > self.keep * examples * columns:
            return batch
        return pack(batch, rows, 2 * columns)
