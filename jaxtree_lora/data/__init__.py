"""Streams of tasks from real data: offline package data, TRACE directories, prepared tfds datasets,
and the user's own files (files.py).

    stream = get_stream(config.data, tokenizer)

`config.data.name` picks the source; the other fields (defaults in brackets) are:

  "offline-text-cil"  class-incremental text (offline.offline_text_cil): num_tasks [5],
                      classes_per_task [0: use num_tasks], max_len [64], per_class_train [96],
                      per_class_test [48], seed [0], classes [the 10 default classes]
  "offline-lang-cil"  class-incremental language identification over the ChatterBot corpus, one class
                      per language (offline.offline_lang_cil): num_tasks [10], classes_per_task [0: use
                      num_tasks], max_len [64], per_class_train [40], per_class_test [20], seed [0],
                      classes [the 20 languages with the most texts; any of the corpus's 28 folders]
  "offline-fashion-cil" class-incremental Fashion-MNIST images (fashion.offline_fashion_cil), 28x28
                      grey as [N, 28, 28, 3] uint8: num_tasks [5], classes_per_task [0], per_class_train
                      [160], per_class_test [50], seed [0], classes [all 10], data_dir [the
                      fashion_mnist asset; or a folder of MNIST-style IDX files]
  "offline-trace"     TRACE-style instruction tasks (offline.offline_trace): per_task_train [48],
                      per_task_test [24], max_prompt_len [96], max_answer_len [8],
                      chat_template [True], seed [0], tasks [all six]
  "trace"             a TRACE directory (trace.trace_stream): root, tasks [TRACE order], max_train [0: all],
                      max_eval (or max_test) [0: all], eval_split ["test"], max_prompt_len [1024],
                      max_answer_len [512], chat_template [False]
  "tfds"              a prepared tfds image dataset (tfds_source.tfds_stream): dataset ["cifar100"],
                      data_dir, num_tasks [10], classes_per_task [0], image_size [224], seed [0],
                      train_split ["train"], test_split ["test"; "" holds out test_fraction [0.2]],
                      image_dtype ["uint8" | "float32"], image_key ["image"], label_key ["label"],
                      limit [0: all]
  "files"             text classification from a file (files.files_stream): train (CSV, TSV, JSONL,
                      Parquet by extension; a folder of Parquet shards; a save_to_disk folder), test [""]
                      [none: hold out test_fraction [0.2] of every class, seeded], text_column ["text"],
                      label_column ["label"] (strings or integers), num_tasks [5], classes_per_task [0],
                      task_column ["": class-incremental; a column: one task per value], max_len [64],
                      seed [0]
  "instruction_files" one file per instruction task (files.instruction_files_stream): train (a list, or
                      "a.jsonl,b.jsonl"), test [none: hold out test_fraction [0.2]], prompt_column
                      ["prompt"], answer_column ["answer"], metrics [accuracy: one name, a list per
                      task, or a mapping task -> name; see evaluation/task_metrics.py],
                      max_prompt_len [512], max_answer_len [64], chat_template [False], seed [0]
  "image_folder"      class-per-subfolder images (files.image_folder_stream): data_dir (or root) with
                      train/<class>/ and test/<class>/, or only <class>/ and test_fraction [0.2];
                      or train / test folders; image_size [224], image_dtype ["uint8"], num_tasks [5],
                      classes_per_task [0], seed [0]
  "sequence"          tasks chained from several sources (files.sequence_stream): sources, a list of
                      data configs (dicts, or JSON text on the command line), each one task by default
                      (num_tasks [1]); max_len, seed, max_prompt_len, max_answer_len, chat_template,
                      image_size, test_fraction and the column names come from this level unless a
                      source sets them. Classification sources get disjoint class ids (offset per
                      source); instruction sources' tasks are concatenated; the two kinds cannot mix.
"""
from __future__ import annotations

import functools

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, check_stream, class_incremental  # noqa: F401

NAMES = ("offline-text-cil", "offline-lang-cil", "offline-fashion-cil", "offline-trace", "trace", "tfds", "files", "instruction_files", "image_folder", "sequence")


def _need_tokenizer(tokenizer, name):
    if tokenizer is None:
        raise DataError(f"data {name!r} is text but the backbone has no tokenizer: use a text backbone "
                        f"(model.name minilm, smollm2 or an HF text model)")


def _names(value) -> tuple:
    """A list of names from a list or tuple of strings, or one comma-separated string."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TypeError(value)
    return tuple(value)


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", _names: "a list of names"}


def _setting(config, key: str, default, cast):
    """config.KEY as `cast` (None or absent: `default`); a value of another type is a DataError naming
    the key, not a TypeError deep in a source."""
    value = config.get(key, None)
    if value is None:
        return default
    try:
        if cast is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if cast is bool and value not in (True, False):  # 0 and 1 mean false and true
            raise ValueError(value)
        if cast is str and not isinstance(value, (str, int, float)):
            raise ValueError(value)
        if cast is float and isinstance(value, bool):
            raise ValueError(value)
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"data.{key} must be {KINDS[cast]}, got {value!r}") from None


def get_stream(config, tokenizer=None) -> Stream:
    """The Stream that `config` (an ml_collections.ConfigDict, or any mapping with .get) describes."""
    name = config.get("name", None)
    get = config.get
    integer, real, flag, text = (functools.partial(_setting, config, cast=cast) for cast in (int, float, bool, str))
    names = functools.partial(_setting, config, cast=_names)
    if name in ("offline-text-cil", "offline-lang-cil"):
        from jaxtree_lora.data.offline import CLASS_STREAMS

        _need_tokenizer(tokenizer, name)
        # The keys the config sets; the rest take the stream builder's own defaults.
        given = {key: integer(key, None) for key in ("max_len", "num_tasks", "per_class_train", "per_class_test", "seed",
                                                     "classes_per_task")}
        given["classes"] = names("classes", ())
        return CLASS_STREAMS[name](tokenizer, **{key: value for key, value in given.items() if value is not None})
    if name == "offline-fashion-cil":
        from jaxtree_lora.data.fashion import offline_fashion_cil

        given = {key: integer(key, None) for key in ("num_tasks", "per_class_train", "per_class_test", "seed",
                                                     "classes_per_task")}
        given["classes"] = names("classes", ())
        given["data_dir"] = text("data_dir", None)
        return offline_fashion_cil(**{key: value for key, value in given.items() if value is not None})
    if name == "offline-trace":
        from jaxtree_lora.data.offline import DEFAULT_TRACE_TASKS, offline_trace

        _need_tokenizer(tokenizer, name)
        return offline_trace(tokenizer, per_task_train=integer("per_task_train", 48),
                             per_task_test=integer("per_task_test", 24),
                             max_prompt_len=integer("max_prompt_len", 96),
                             max_answer_len=integer("max_answer_len", 8),
                             chat_template=flag("chat_template", True), seed=integer("seed", 0),
                             tasks=names("tasks", ()) or DEFAULT_TRACE_TASKS)
    if name == "trace":
        from jaxtree_lora.data.trace import TRACE_ORDER, trace_stream

        _need_tokenizer(tokenizer, name)
        max_eval = integer("max_eval", None)
        return trace_stream(get("root", ""), tokenizer, tasks=names("tasks", ()) or TRACE_ORDER,
                            max_train=integer("max_train", 0),
                            max_eval=max_eval if max_eval is not None else integer("max_test", 0),
                            max_prompt_len=integer("max_prompt_len", 1024),
                            max_answer_len=integer("max_answer_len", 512),
                            chat_template=flag("chat_template", False),
                            eval_split=text("eval_split", "test"))
    if name == "tfds":
        from jaxtree_lora.data.tfds_source import tfds_stream

        return tfds_stream(get("dataset", "cifar100"), get("data_dir", ""), num_tasks=integer("num_tasks", 10),
                           seed=integer("seed", 0), image_size=integer("image_size", 224),
                           train_split=get("train_split", "train"), test_split=get("test_split", "test"),
                           limit=integer("limit", 0), image_dtype=text("image_dtype", "uint8"),
                           image_key=text("image_key", "image"), label_key=text("label_key", "label"),
                           test_fraction=real("test_fraction", 0.2),
                           classes_per_task=integer("classes_per_task", 0))
    if name == "files":
        from jaxtree_lora.data.files import files_stream

        _need_tokenizer(tokenizer, name)
        return files_stream(tokenizer, get("train", "") or "", test=get("test", "") or "",
                            text_column=text("text_column", "text"), label_column=text("label_column", "label"),
                            task_column=text("task_column", ""), num_tasks=integer("num_tasks", 5),
                            classes_per_task=integer("classes_per_task", 0),
                            test_fraction=real("test_fraction", 0.2), max_len=integer("max_len", 64),
                            seed=integer("seed", 0))
    if name == "instruction_files":
        from jaxtree_lora.data.files import instruction_files_stream

        _need_tokenizer(tokenizer, name)
        return instruction_files_stream(tokenizer, get("train", None), get("test", None),
                                        prompt_column=text("prompt_column", "prompt"),
                                        answer_column=text("answer_column", "answer"), metrics=get("metrics", None),
                                        test_fraction=real("test_fraction", 0.2), seed=integer("seed", 0),
                                        max_prompt_len=integer("max_prompt_len", 512),
                                        max_answer_len=integer("max_answer_len", 64),
                                        chat_template=flag("chat_template", False))
    if name == "image_folder":
        from jaxtree_lora.data.files import image_folder_stream

        return image_folder_stream(root=get("data_dir", "") or get("root", "") or "", train=get("train", "") or "",
                                   test=get("test", "") or "", image_size=integer("image_size", 224),
                                   num_tasks=integer("num_tasks", 5),
                                   classes_per_task=integer("classes_per_task", 0), seed=integer("seed", 0),
                                   test_fraction=real("test_fraction", 0.2),
                                   image_dtype=text("image_dtype", "uint8"))
    if name == "sequence":
        from jaxtree_lora.data.files import sequence_stream

        return sequence_stream(config, tokenizer, get_stream)
    raise DataError(f"unknown data.name {name!r}: choose one of {', '.join(NAMES)}")


def checked_stream(config, tokenizer=None, vocab_size: int = 0) -> Stream:
    """The stream a run trains on: `get_stream`, then `check_stream` against the model's vocabulary.
    Every problem with the data is a DataError of one line naming the fix (the CLI: exit status 2)."""
    stream = get_stream(config, tokenizer)
    check_stream(stream, vocab_size)
    return stream
