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
    """One split (train or test) of one task.

    Classification: `inputs` ("input_ids"/"attention_mask" [N, T] int32, or "images" [N, H, W, C]),
    `labels` [N] int32 GLOBAL class ids, and the raw `texts` where the inputs are text.
    Instruction: `prompts`, `answers` (N strings each) and the tokenised `arrays` ("input_ids",
    "attention_mask", "loss_mask" [N, T]; "prompt_ids", "prompt_mask" [N, P], left-padded).
    """

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
    """One task of a stream. `classes`: its global class ids (classification). `metric`: how generated
    answers are scored (instruction: "accuracy", "first_char", "rouge_l", "sari", "fuzzy",
    "exact_match"). `max_new_tokens`: the generation budget at evaluation."""

    index: int
    name: str
    train: Split
    test: Split
    classes: tuple = ()
    metric: str = "accuracy"
    max_new_tokens: int = 8


@dataclasses.dataclass
class Stream:
    """An ordered list of tasks of one kind ("classification" or "instruction")."""

    name: str
    kind: str
    tasks: list
    num_classes: int = 0
    class_names: tuple = ()
    class_order: tuple = ()
    metadata: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def class_mask(self, upto_task: int) -> np.ndarray:
        """[num_classes] bool: the classes of tasks 0..upto_task (evaluation without task identity)."""
        if not 0 <= upto_task < len(self.tasks):
            raise DataError(f"task {upto_task} is outside the stream's {len(self.tasks)} tasks")
        mask = np.zeros((self.num_classes,), bool)
        for task in self.tasks[: upto_task + 1]:
            mask[list(task.classes)] = True
        return mask


def check_stream(stream: Stream, vocab_size: int = 0) -> None:
    """Refuses, with the fix, a stream the trainer would learn from silently wrong: no tasks, a task with
    an empty split, labels outside a task's classes (a gather would clamp them to another class), or
    token ids beyond the model's embedding (the gather clamps those too: a tokenizer of another model)."""
    if not stream.tasks:
        raise DataError("the stream has no tasks: set data.tasks (or data.num_tasks) to at least one")
    for task in stream.tasks:
        for split, which in ((task.train, "training"), (task.test, "test")):
            if len(split) == 0:
                raise DataError(f"task {task.index} ({task.name}) has no {which} examples: add data for it or "
                                f"leave it out of the stream (data.tasks / data.num_tasks)")
            if stream.kind == "classification":
                classes = np.asarray(sorted(task.classes), np.int64)
                if classes.size and (classes.min() < 0 or classes.max() >= stream.num_classes):
                    raise DataError(f"task {task.index} ({task.name}) names classes outside [0, "
                                    f"{stream.num_classes}): fix the class list of the stream")
                labels = np.asarray(split.labels)
                outside = labels[~np.isin(labels, classes)]
                if outside.size:
                    raise DataError(f"task {task.index} ({task.name}) has {which} label {int(outside[0])}, outside "
                                    f"its classes {classes.tolist()} ({stream.num_classes} classes in all): fix the "
                                    f"label column (data.label_key) or the class names")
            if vocab_size:
                arrays = split.inputs if stream.kind == "classification" else split.arrays
                for key in ("input_ids", "prompt_ids"):
                    ids = arrays.get(key)
                    if ids is None or not np.size(ids):
                        continue
                    low, high = int(np.min(ids)), int(np.max(ids))
                    if low < 0 or high >= vocab_size:
                        raise DataError(f"task {task.index} ({task.name}) holds token id {high if high >= vocab_size else low} "
                                        f"but the model's embedding has {vocab_size} rows: the tokenizer does not "
                                        f"belong to the model; use the tokenizer saved with the checkpoint")


def split_classes(class_order: Sequence[int], num_tasks: int = 0, classes_per_task: int = 0) -> list[list[int]]:
    """Cuts a class order into consecutive tasks.

    With `classes_per_task`, every task but possibly the last has exactly that many classes; with
    `num_tasks`, sizes differ by at most one and the first tasks take the remainder.
    """
    classes = list(class_order)
    if classes_per_task:
        if classes_per_task < 1:
            raise DataError("data.classes_per_task must be >= 1")
        return [classes[i:i + classes_per_task] for i in range(0, len(classes), classes_per_task)]
    if num_tasks < 1:
        raise DataError("the stream needs at least one task: set data.num_tasks >= 1 (or data.classes_per_task)")
    if num_tasks > len(classes):
        raise DataError(f"{num_tasks} tasks need at least as many classes, but there are {len(classes)}: "
                        f"lower data.num_tasks")
    return [[int(c) for c in part] for part in np.array_split(np.asarray(classes), num_tasks)]


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """The seeded class order: numpy's permutation under `seed`, as PyCIL and PILOT seed theirs."""
    if not shuffle:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def class_incremental(name: str, train: Split, test: Split, class_names: Sequence[str], num_tasks: int = 0,
                      seed: int = 0, shuffle_classes: bool = True, metadata: Optional[dict] = None, *,
                      classes_per_task: int = 0) -> Stream:
    """A class-incremental Stream from one labelled train split and one test split.

    `train.labels`/`test.labels` are global ids into `class_names`; the class order is a seeded
    permutation, cut into `num_tasks` tasks (or tasks of `classes_per_task` classes). Every task
    must have training and test examples of its classes.
    """
    num_classes = len(class_names)
    for split, which in ((train, "training"), (test, "test")):
        if split.labels is None or len(split.labels) == 0:
            raise DataError(f"the {which} split has no labelled examples: check the data source")
        if int(np.min(split.labels)) < 0 or int(np.max(split.labels)) >= num_classes:
            raise DataError(f"{which} labels must lie in [0, {num_classes}) for {num_classes} class names")
    order = class_order(num_classes, seed, shuffle_classes)
    tasks = []
    for index, classes in enumerate(split_classes(order, num_tasks, classes_per_task)):
        parts = []
        for split, which in ((train, "training"), (test, "test")):
            rows = np.flatnonzero(np.isin(split.labels, classes))
            if len(rows) == 0:
                raise DataError(f"task {index} (classes {[class_names[c] for c in classes]}) has no {which} "
                                f"examples: check the data or lower data.num_tasks")
            parts.append(Split(inputs={k: v[rows] for k, v in split.inputs.items()},
                               labels=np.asarray(split.labels[rows], np.int32),
                               texts=[split.texts[i] for i in rows] if split.texts else []))
        task_name = "+".join(str(class_names[c]) for c in classes)
        tasks.append(Task(index=index, name=task_name, train=parts[0], test=parts[1], classes=tuple(classes)))
    return Stream(name=name, kind="classification", tasks=tasks, num_classes=num_classes,
                  class_names=tuple(class_names), class_order=tuple(order), metadata=dict(metadata or {}))
