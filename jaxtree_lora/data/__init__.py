"""Streams of tasks from real data: offline package data, TRACE directories, prepared tfds datasets.

    stream = get_stream(config.data, tokenizer)

config.data.name:
  "offline-text-cil"  class-incremental text (offline.offline_text_cil): num_tasks, max_len,
                      per_class_train, per_class_test, seed
  "offline-trace"     TRACE-style instruction tasks (offline.offline_trace): per_task_train,
                      per_task_test, max_prompt_len, max_answer_len, chat_template, seed
  "trace"             a TRACE directory (trace.trace_stream): root, tasks, max_train, max_test,
                      max_prompt_len, max_answer_len, chat_template
  "tfds"              a prepared tfds image dataset (tfds_source.tfds_stream): dataset, data_dir,
                      num_tasks, image_size, seed, train_split, test_split
"""
from __future__ import annotations

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, class_incremental  # noqa: F401

NAMES = ("offline-text-cil", "offline-trace", "trace", "tfds")


def _need_tokenizer(tokenizer, name):
    if tokenizer is None:
        raise DataError(f"data {name!r} is text but the backbone has no tokenizer: use a text backbone")


def get_stream(config, tokenizer=None) -> Stream:
    name = config.name
    get = config.get
    if name == "offline-text-cil":
        from jaxtree_lora.data.offline import offline_text_cil

        _need_tokenizer(tokenizer, name)
        return offline_text_cil(tokenizer, max_len=int(get("max_len", 64)), num_tasks=int(get("num_tasks", 5)),
                                per_class_train=int(get("per_class_train", 96)),
                                per_class_test=int(get("per_class_test", 48)), seed=int(get("seed", 0)),
                                classes=tuple(get("classes", ()) or ()))
    if name == "offline-trace":
        from jaxtree_lora.data.offline import offline_trace

        _need_tokenizer(tokenizer, name)
        kwargs = dict(per_task_train=int(get("per_task_train", 32)), per_task_test=int(get("per_task_test", 24)),
                      max_prompt_len=int(get("max_prompt_len", 64)), max_answer_len=int(get("max_answer_len", 8)),
                      chat_template=bool(get("chat_template", True)), seed=int(get("seed", 0)))
        if get("tasks", None):
            kwargs["tasks"] = tuple(config.tasks)
        return offline_trace(tokenizer, **kwargs)
    if name == "trace":
        from jaxtree_lora.data.trace import TRACE_ORDER, trace_stream

        _need_tokenizer(tokenizer, name)
        return trace_stream(get("root", ""), tokenizer, tasks=tuple(get("tasks", TRACE_ORDER) or TRACE_ORDER),
                            max_train=int(get("max_train", 0)), max_test=int(get("max_test", 0)),
                            max_prompt_len=int(get("max_prompt_len", 1024)),
                            max_answer_len=int(get("max_answer_len", 512)),
                            chat_template=bool(get("chat_template", False)))
    if name == "tfds":
        from jaxtree_lora.data.tfds_source import tfds_stream

        return tfds_stream(get("dataset", "cifar100"), get("data_dir", ""), num_tasks=int(get("num_tasks", 10)),
                           seed=int(get("seed", 0)), image_size=int(get("image_size", 224)),
                           train_split=get("train_split", "train"), test_split=get("test_split", "test"),
                           limit=int(get("limit", 0)))
    raise DataError(f"unknown data.name {name!r}: choose one of {', '.join(NAMES)}")
