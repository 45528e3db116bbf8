"""Instruction tasks: answers generated from the prompts, scored by the task's own metric.

Prompts of one task mostly begin alike (a chat template's system turn, the task's instruction):
`SharedPrompts` prefills that prefix once per batch instead of once per row and batches the rows'
own parts by length (`models.generate`, `prefix_ids`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

from jaxtree_lora.data import batching
from jaxtree_lora.evaluation import task_metrics


def shared_prefix_length(ids: np.ndarray, mask: np.ndarray) -> int:
    """Tokens every row's real prompt begins with, leaving each row at least one token of its own.
    ids, mask: [N, P] left-padded."""
    rows = [row[keep > 0] for row, keep in zip(np.asarray(ids), np.asarray(mask))]
    shortest = min((len(row) for row in rows), default=0) - 1
    if shortest < 1:
        return 0
    heads = np.stack([row[:shortest] for row in rows])
    differs = np.any(heads != heads[0], axis=0)
    return int(np.argmax(differs)) if differs.any() else shortest


@dataclasses.dataclass(frozen=True)
class SharedPrompts:
    """A stream's test prompts split into the prefix each task's rows share and each row's own part.

    prefix_ids / prefix_mask: {task: [width]} the shared tokens, left-padded to one width for the stream;
    ids / mask: {task: [N, P]} each row's own tokens, left-padded; widths: bucket widths of the own
    parts for the stream (few shapes: each is a compile); pad: the pad id."""

    prefix_ids: dict
    prefix_mask: dict
    ids: dict
    mask: dict
    widths: tuple
    pad: int

    @classmethod
    def for_stream(cls, tasks: Sequence, pad: int, batch_size: int, minimum: int = 8, multiple: int = 8):
        """None when no task's prompts share `minimum` tokens (nothing to gain)."""
        lengths = {task.index: shared_prefix_length(task.test.arrays["prompt_ids"], task.test.arrays["prompt_mask"])
                   for task in tasks if len(task.test.arrays["prompt_ids"])}
        lengths = {index: (length if length >= minimum else 0) for index, length in lengths.items()}
        if not lengths or max(lengths.values()) == 0:
            return None
        width = -(-max(lengths.values()) // multiple) * multiple
        prefix_ids, prefix_mask, ids, mask, longest = {}, {}, {}, {}, []
        for task in tasks:
            if task.index not in lengths:
                continue
            length, full_ids = lengths[task.index], np.asarray(task.test.arrays["prompt_ids"])
            full_mask = np.asarray(task.test.arrays["prompt_mask"])
            rows = [row[keep > 0] for row, keep in zip(full_ids, full_mask)]
            prefix_ids[task.index] = np.full((width,), pad, np.int32)
            prefix_mask[task.index] = np.zeros((width,), np.int32)
            if length:
                prefix_ids[task.index][width - length:] = rows[0][:length]
                prefix_mask[task.index][width - length:] = 1
            ids[task.index] = np.full(full_ids.shape, pad, np.int32)
            mask[task.index] = np.zeros(full_mask.shape, np.int32)
            for number, row in enumerate(rows):
                part = row[length:]
                ids[task.index][number, full_ids.shape[1] - len(part):] = part
                mask[task.index][number, full_ids.shape[1] - len(part):] = 1
            # Batches take the rows shortest first: each batch's longest own part is known here.
            own = np.sort([len(row) - length for row in rows])
            longest += [own[min(start + batch_size, len(own)) - 1] for start in range(0, len(own), batch_size)]
        total = max(array.shape[1] for array in ids.values())
        widths = batching.choose_buckets(np.asarray(longest), total, 1, multiple=multiple)
        return cls(prefix_ids, prefix_mask, ids, mask, widths, int(pad))

    def batches(self, task: int, batch_size: int) -> Iterable[dict]:
        """The task's prompts, shortest own part first, in `batching.batches` (fixed size, "weight" 0 on
        the last batch's filler rows), each cut to the smallest of `widths` holding its rows
        (`LengthBuckets`): "prompt_ids", "prompt_mask" (own parts), "prefix_ids", "prefix_mask",
        "weight", and "rows" (their indices in the test split, for putting the answers back in order)."""
        order = np.argsort(batching.real_extent(self.mask[task], "left"), kind="stable")
        arrays = {"prompt_ids": self.ids[task][order], "prompt_mask": self.mask[task][order], "rows": order}
        buckets = batching.LengthBuckets({"prompt_mask": (("prompt_ids", "prompt_mask"), "left", self.widths)})
        for batch in buckets.batches(arrays, batch_size, seed=0, task=task, epoch=0, shuffle=False):
            yield {**batch, "prefix_ids": self.prefix_ids[task], "prefix_mask": self.prefix_mask[task]}


def generate_and_score(task, batches: Iterable[dict], generate: Callable[[dict, int], np.ndarray], decode,
                       after_batch: Callable[[], None] = lambda: None) -> tuple[float, list]:
    """Generates an answer for every test prompt of `task` and scores them with `task.metric`.

    `batches`: the test split's prompt batches ("prompt_ids", "prompt_mask" [B, P] and "weight" [B];
    optionally "rows" [B]: each row's index in the test split, else they come in order);
    `generate(batch, number) -> [B, new]` token ids; `decode(ids) -> str`. Returns (score 0-100, answers).
    """
    count = len(task.test.answers)
    predictions: list = [None] * count
    following = 0  # the next test row, for batches in order
    for number, batch in enumerate(batches):
        weight = batch.pop("weight")
        rows = batch.pop("rows", None)
        tokens = np.asarray(generate(batch, number))
        real = np.flatnonzero(np.asarray(weight) > 0)
        indices = np.arange(following, following + len(real)) if rows is None else np.asarray(rows)[real]
        following += len(real)
        for position, index in zip(real, indices):
            if index < count:
                predictions[int(index)] = decode(tokens[position].tolist())
        after_batch()
    if any(prediction is None for prediction in predictions):
        raise ValueError(f"task {task.name}: the batches covered {sum(p is not None for p in predictions)} of "
                         f"{count} test prompts")
    score = task_metrics.score(task.metric, predictions, list(task.test.answers), sources=list(task.test.prompts))
    return float(score), predictions
