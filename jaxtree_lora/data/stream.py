"""Streams of tasks: the data model every source produces and the trainer consumes.

A `Stream` is an ordered list of `Task`s of one kind:

- "classification": class-incremental. Each task owns a disjoint set of GLOBAL class ids; a split
  holds `inputs` (text: "input_ids"/"attention_mask" [N, T]; images: "images" [N, H, W, C]) and
  `labels` [N]. Evaluation is task-identity free: over every class seen so far (`class_mask`).
- "instruction": TRACE-style. A split holds `prompts` and `answers` and, after tokenising, `arrays`:
  "input_ids", "attention_mask", "loss_mask" [N, T] (loss on answer tokens only) and left-padded
  "prompt_ids"/"prompt_mask" [N, P] for generation. Each task names its metric.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


class DataError(ValueError):
    """Data that cannot form a stream (the message names the fix)."""


@dataclasses.dataclass
class Split:
    inputs: dict = dataclasses.field(default_factory=dict)
    labels: Optional[np.ndarray] = None
    prompts: list = dataclasses.field(default_factory=list)
    answers: list = dataclasses.field(default_factory=list)
    arrays: dict = dataclasses.field(default_factory=dict)
    texts: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        return len(self.prompts)


@dataclasses.dataclass
class Task:
    index: int
    name: str
    train: Split
    test: Split
    classes: tuple = ()
    metric: str = "accuracy"
    max_new_tokens: int = 8


@dataclasses.dataclass
class Stream:
    name: str
    kind: str  # "classification" | "instruction"
    tasks: list
    num_classes: int = 0
    class_names: tuple = ()
    class_order: tuple = ()
    metadata: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def class_mask(self, upto_task: int) -> np.ndarray:
        """[num_classes] bool: the classes of tasks 0..upto_task (evaluation without task identity)."""
        mask = np.zeros((self.num_classes,), bool)
        for task in self.tasks[: upto_task + 1]:
            mask[list(task.classes)] = True
        return mask


def split_classes(class_order: Sequence[int], num_tasks: int = 0, classes_per_task: int = 0) -> list[list[int]]:
    """Cuts a class order into consecutive tasks (equal sizes; a remainder goes to the first tasks)."""
    classes = list(class_order)
    if classes_per_task:
        num_tasks = int(np.ceil(len(classes) / classes_per_task))
    if num_tasks < 1:
        raise DataError("the stream needs at least one task: set data.num_tasks >= 1")
    if num_tasks > len(classes):
        raise DataError(f"{num_tasks} tasks need at least as many classes, but there are {len(classes)}: "
                        f"lower data.num_tasks")
    return [list(part) for part in np.array_split(np.asarray(classes), num_tasks)]


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """The seeded class order (numpy permutation, as PILOT/PyCIL seed theirs)."""
    if not shuffle:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def class_incremental(name: str, train: Split, test: Split, class_names: Sequence[str], num_tasks: int, seed: int,
                      shuffle_classes: bool = True, metadata: Optional[dict] = None) -> Stream:
    """A class-incremental Stream from one labelled train and test split (labels are global ids)."""
    num_classes = len(class_names)
    order = class_order(num_classes, seed, shuffle_classes)
    tasks = []
    for index, classes in enumerate(split_classes(order, num_tasks)):
        parts = []
        for split in (train, test):
            rows = np.flatnonzero(np.isin(split.labels, classes))
            if len(rows) == 0:
                raise DataError(f"task {index} (classes {classes}) has no {'training' if split is train else 'test'} "
                                f"examples: check the data or lower data.num_tasks")
            parts.append(Split(inputs={k: v[rows] for k, v in split.inputs.items()}, labels=split.labels[rows],
                               texts=[split.texts[i] for i in rows] if split.texts else []))
        task_name = "+".join(class_names[c] for c in classes)
        tasks.append(Task(index=index, name=task_name, train=parts[0], test=parts[1], classes=tuple(classes)))
    return Stream(name=name, kind="classification", tasks=tasks, num_classes=num_classes,
                  class_names=tuple(class_names), class_order=tuple(order), metadata=dict(metadata or {}))
