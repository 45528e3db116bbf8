"""Instruction tasks: answers generated from the prompts, scored by the task's own metric."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from jaxtree_lora.evaluation import task_metrics


def generate_and_score(task, batches: Iterable[dict], generate: Callable[[dict, int], np.ndarray], decode,
                       after_batch: Callable[[], None] = lambda: None) -> tuple[float, list]:
    """Generates an answer for every test prompt of `task` and scores them with `task.metric`.

    `batches`: the test split's prompt batches ("prompt_ids", "prompt_mask" [B, P] and "weight" [B]);
    `generate(batch, number) -> [B, new]` token ids; `decode(ids) -> str`. Returns (score 0-100, answers).
    """
    predictions = []
    count = len(task.test.answers)
    for number, batch in enumerate(batches):
        weight = batch.pop("weight")
        tokens = np.asarray(generate(batch, number))
        for row, real in zip(tokens, weight):
            if real > 0 and len(predictions) < count:
                predictions.append(decode(row.tolist()))
        after_batch()
    score = task_metrics.score(task.metric, predictions, list(task.test.answers), sources=list(task.test.prompts))
    return float(score), predictions
