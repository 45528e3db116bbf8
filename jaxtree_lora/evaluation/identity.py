"""Task-identity inference (HiDe-LoRA's use of the pre-trained model): an example belongs to the task
of its nearest pre-trained class mean. For methods whose protocol is told the task at test time
(LiLoRA), `eval.task_identity=inferred` replaces the given identity with this one."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from jaxtree_lora.evaluation import prototypes as prototypes_lib


class TaskIdentity:
    """Nearest pre-trained class mean -> task.

    `task_means(task) -> [classes of the task, d]` gives the pre-trained class means of one task (a
    function of frozen weights and data only, so it is recomputed after a resume, never checkpointed);
    `features(batch) -> [B, d]` the pre-trained features of a batch (None: `infer` is given the
    features themselves, as the evaluator does with the features it keeps for the run)."""

    def __init__(self, task_means: Callable[[int], np.ndarray], features: Optional[Callable[[dict], np.ndarray]]):
        self._task_means = task_means
        self._features = features or (lambda features: features)
        self._cache: dict[int, np.ndarray] = {}

    def means(self, task: int) -> np.ndarray:
        if task not in self._cache:
            self._cache[task] = self._task_means(task)
        return self._cache[task]

    def infer(self, batch: dict, trained_upto: int) -> np.ndarray:
        """[B] int32: the inferred task (among 0..trained_upto) of every example of the batch (or of the
        features [B, d] given, when the identity was built without a feature function)."""
        means = [self.means(task) for task in range(trained_upto + 1)]
        owners = np.concatenate([np.full((len(m),), task, np.int32) for task, m in enumerate(means)])
        return prototypes_lib.nearest(np.asarray(self._features(batch), np.float64), np.concatenate(means), owners)
