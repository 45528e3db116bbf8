"""What a run's batches look like, decided once per stream before anything is compiled.

The widths every batch is cut to (`batching`: length buckets, or the full width), whether training
batches are packed (`packer`) and into which row counts (`packed_rows`, from every step of every
task's `epochs_for`), the class masks the step and the evaluator read (`stream_consts`)
and how many trailing columns the LM head reads on instruction streams (`answer_window`). Pure
functions of the config, the stream and the backbone.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from jaxtree_lora.data import batching as batching_lib
from jaxtree_lora.data import packing, tokenize
from jaxtree_lora.errors import ConfigError


def batching(config, stream, rows: int):
    """`data.batching` itself, or `LengthBuckets` over every split of a text stream (`train.length_buckets`):
    every batch (train, evaluation, statistics) cut to the smallest of a few widths that holds its
    longest row, so no compute goes to padding columns and the number of compiles stays bounded.
    `rows`: the rows of one optimiser step."""
    kind = stream.kind
    if not (config.train.get("length_buckets", True) and kind in ("classification", "instruction")):
        return batching_lib
    splits = [split.inputs if kind == "classification" else split.arrays
              for task in stream.tasks for split in (task.train, task.test)]
    return batching_lib.LengthBuckets.for_splits(splits, "right" if kind == "classification" else "left", rows)


def packer(config, stream, backbone, devices: int, micro_batch: int, accumulation: int):
    """A `data.packing.Packer` for the training batches where packing applies (`train.pack`): text
    classification on an encoder, one device in one process (a packed row mixes examples, so it
    cannot follow the batch's split over devices), every text's tokens at the front of its row.
    None otherwise. Evaluation and the feature passes pack their own batches (`feature_packer`)."""
    if not (config.train.get("pack", True) and stream.kind == "classification"
            and getattr(backbone, "kind", "") == "encoder" and devices == 1 and jax.process_count() == 1):
        return None
    if not all("attention_mask" in task.train.inputs and packing.right_padded(task.train.inputs["attention_mask"])
               for task in stream.tasks):
        return None  # not right-padded (or no mask): rows cannot be laid end to end
    return packing.Packer(micro_batch, accumulation, packed_rows(config, stream, micro_batch, accumulation))


def epochs_for(config, task: int) -> int:
    """Task `task`'s epochs: `train.epochs`, one integer or one entry per task."""
    epochs = config.train.epochs
    if isinstance(epochs, (list, tuple)):
        if len(epochs) == 1:
            return int(epochs[0])
        if task >= len(epochs):
            raise ConfigError(f"train.epochs lists {len(epochs)} tasks but the stream has more: "
                              f"give one entry per task or a single integer")
        return int(epochs[task])
    return int(epochs)


def packed_rows(config, stream, micro_batch: int, accumulation: int) -> tuple[int, ...]:
    """The row counts of the stream's packed training batches (`packing.plan_rows`), from the rows every
    step of every task and epoch needs: its batches are a pure function of (seed, task, epoch), so
    they are packed here as the run will pack them. Counts few steps need join the next one up."""
    packer = packing.Packer(micro_batch, accumulation)
    needs: dict = {}
    for index, task in enumerate(stream.tasks):
        mask = {"attention_mask": task.train.inputs["attention_mask"]}
        for epoch in range(epochs_for(config, index)):
            for batch in batching_lib.batches(mask, micro_batch * accumulation, seed=int(config.seed), task=index,
                                              epoch=epoch, shuffle=True):
                rows = packer.rows(batch)
                needs[rows] = needs.get(rows, 0) + 1
    return packing.plan_rows(needs)


def feature_packer(config, stream, backbone):
    """A `data.packing.FeaturePacker` for the forwards that only take features (evaluation, statistics
    and feature passes) where packing applies (`train.pack`): text classification on an encoder. Those
    batches reach every device whole, so any mesh and process count can take them. None otherwise."""
    if not (config.train.get("pack", True) and stream.kind == "classification"
            and getattr(backbone, "kind", "") == "encoder"):
        return None
    if not any("attention_mask" in split.inputs for task in stream.tasks for split in (task.train, task.test)):
        return None
    return packing.FeaturePacker()


# Evaluation batches when the config leaves eval.batch_size unset: at most this many rows, a multiple of
# ROW_MULTIPLE, and a forward's fixed cost counted as FORWARD_ROWS rows when sizes are compared.
EVAL_ROWS, ROW_MULTIPLE, FORWARD_ROWS = 96, 8, 8


def evaluation_batch_size(config, stream) -> int:
    """Rows of every evaluation and feature-pass forward: `eval.batch_size` where the config sets it;
    else the multiple of 8 up to 96 that forwards the fewest rows over every task's train and test split
    (a split's last batch is filled to the size with rows of weight 0), each forward counted as 8 rows
    more: the largest size within 5% of the fewest. A stream of 40-example test sets gets 40 where 96
    computed 56 filler rows in every test forward; one of 192 / 96 keeps 96."""
    given = config.eval.get("batch_size", None)
    if given is not None:
        return int(given)
    sizes = [len(split) for task in stream.tasks for split in (task.train, task.test) if len(split)]
    if not sizes:
        return EVAL_ROWS

    def cost(rows: int) -> int:
        forwards = sum(-(-size // rows) for size in sizes)
        return forwards * (rows + FORWARD_ROWS)

    candidates = range(ROW_MULTIPLE, EVAL_ROWS + 1, ROW_MULTIPLE)
    least = min(cost(rows) for rows in candidates)
    return max(rows for rows in candidates if cost(rows) <= 1.05 * least)


def evaluation_options(config, stream) -> dict:
    """The Evaluator's options the config's `eval` section sets (generation's temperature and shared
    prompt prefixes, the evaluation batch size)."""
    return {"temperature": float(config.eval.get("temperature", 0.0)), "batch_size": evaluation_batch_size(config, stream),
            "share_prefix": bool(config.eval.get("share_prefix", True))}


# A split's last evaluation batch is cut to one of the stream's tail sizes instead of filled to the batch
# size; a tail few splits need joins the next one up when that adds at most this many rows (one more
# shape of each forward compiles once: about as long as 30-50 image forwards with the cache filled).
EVAL_TAIL_MERGE_ROWS = 64


def evaluation_tails(stream, batch_size: int) -> tuple[int, ...]:
    """Classification streams: the row counts (multiples of 8, below `batch_size`) a split's last
    evaluation batch is cut to, planned over every task's train and test split (`packing.plan_rows`,
    the full batch among the choices, so a rare tail fills up to it). The README's main job: 256 training
    images a task in batches of 100 end in a batch of 56 rows, not of 100 with 44 of filler. Instruction
    streams keep full batches (a new shape there compiles a whole decode loop)."""
    if stream.kind != "classification":
        return ()
    needs = {batch_size: 1}
    for task in stream.tasks:
        for split in (task.train, task.test):
            rest = len(split) % batch_size
            if rest:
                rows = min(-(-rest // ROW_MULTIPLE) * ROW_MULTIPLE, batch_size)
                needs[rows] = needs.get(rows, 0) + 1
    return tuple(rows for rows in packing.plan_rows(needs, EVAL_TAIL_MERGE_ROWS) if rows < batch_size)


def feature_batches(batching, packer, batch_size: int, stream=None):
    """batches(arrays, task, few=False) -> a task's evaluation batches in order ("weight" 0 on padding
    rows), each packed by `packer` (`feature_packer`) where one is given. Every batch has `batch_size`
    rows but a split's last, which is cut to the smallest of the stream's tail sizes (`evaluation_tails`;
    none without a stream) that holds its real rows (else filled to `batch_size`)."""
    tails = evaluation_tails(stream, batch_size) if stream is not None else ()
    # A quarter of the batch, a multiple of ROW_MULTIPLE: one more shape of each forward, compiled once.
    chunk = max(ROW_MULTIPLE, -(-batch_size // (4 * ROW_MULTIPLE)) * ROW_MULTIPLE)

    def cut(batch: dict) -> dict:
        real = int(np.count_nonzero(batch["weight"]))  # real rows first, filler after (`batching.batches`)
        rows = next((size for size in tails if size >= real), batch_size)
        return {key: value[:rows] for key, value in batch.items()} if rows < len(batch["weight"]) else batch

    def batches(arrays: dict, task: int, few: bool = False):
        """`few`: a few examples forwarded again (the evaluator's reused slot features): in chunks of
        `chunk` rows, none cut, where those fill less than one whole batch."""
        rows = batch_size
        if few and -(-len(next(iter(arrays.values()))) // chunk) * chunk < batch_size:
            rows = chunk
        ordered = batching.batches(arrays, rows, seed=0, task=task, epoch=0, shuffle=False)
        ordered = map(cut, ordered) if tails and rows == batch_size else ordered
        return ordered if packer is None else map(packer, ordered)

    return batches


def stream_consts(stream, max_tasks: int) -> dict:
    """{"task_classes", "seen_classes"}: [max_tasks, num_classes] bool masks of each task's classes and
    of the classes seen up to each task (one all-False column on streams without classes)."""
    classes = int(getattr(stream, "num_classes", 0) or 0)
    task_classes = np.zeros((max_tasks, max(classes, 1)), bool)
    if stream.kind == "classification":
        for task in stream.tasks:
            task_classes[task.index, list(task.classes)] = True
    seen = np.cumsum(task_classes, axis=0) > 0
    return {"task_classes": jax.device_put(task_classes), "seen_classes": jax.device_put(seen)}


def answer_window(stream) -> Optional[int]:
    """Instruction streams: the trailing columns that hold answers, the only ones the LM head runs over."""
    if stream.kind != "instruction":
        return None
    return tokenize.answer_window([split.arrays["loss_mask"] for task in stream.tasks
                                   for split in (task.train, task.test)]) or None
