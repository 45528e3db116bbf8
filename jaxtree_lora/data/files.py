"""Continual streams from the files researchers already have: text classification from CSV, TSV,
JSONL, Parquet or a `datasets` save_to_disk folder (`files_stream`, class-incremental by a seeded
class order or task-incremental by a task column); one instruction file per task, each with its own
metric (`instruction_files_stream`); class-per-subfolder image directories (`image_folder_stream`);
and tasks chained from several sources (`sequence_stream`). Without a test file a seeded share of
every class is held out. Every problem a run would otherwise meet late (a missing column, an empty
text, a test label the training file lacks, undecodable bytes) is a DataError naming the file, the
line and the fix. Formats and options: docs/DATA.md and the README's data options.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, class_incremental
from jaxtree_lora.data.tfds_source import holdout, image_splits
from jaxtree_lora.data.tokenize import (answer_token_ids, pad_id, pad_to_common_length, tokenize_classification,
                                        tokenize_instruction)

csv.field_size_limit(2 ** 31 - 1)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Table:
    """Columns of one file (name -> list of values, None where a row lacks the column) and, per row,
    where it is in the file ("line 7", "row 3 of part-0.parquet") for error messages."""

    path: str
    columns: dict
    places: list
    class_names: dict = dataclasses.field(default_factory=dict)  # column -> names of a ClassLabel

    def __len__(self) -> int:
        return len(self.places)

    def column(self, name: str, option: str) -> list:
        """The values of column `name`; a missing column names the ones that exist and the option."""
        if name not in self.columns:
            raise DataError(f"{self.path} has no column {name!r} (its columns: {', '.join(self.columns) or 'none'}): "
                            f"set data.{option}")
        return self.columns[name]


def _line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def _no_nul(path: str, data: bytes) -> None:
    """NUL bytes mean UTF-16 (Excel's "Unicode Text", PowerShell's `>`): without a byte-order mark it
    decodes as UTF-8 with a NUL beside every character, and then no column name matches."""
    at = data.find(b"\x00")
    if at >= 0:
        raise DataError(f"{path} line {_line_of(data, at)} holds NUL bytes, as UTF-16 files do: save the file as UTF-8")


def _decode(path: str, data: bytes) -> str:
    _no_nul(path, data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} line {_line_of(data, error.start)} holds bytes that are not UTF-8 "
                        f"({data[error.start:error.start + 1]!r}): save the file as UTF-8") from error


def _read_delimited(path: str, delimiter: str) -> Table:
    with open(path, "rb") as file:
        text = _decode(path, file.read())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path} is empty: the first line must name the columns (e.g. text{delimiter}label)")
    header = [name.strip() for name in header]
    named = [name for name in header if name]
    for name in named:
        if named.count(name) > 1:  # one list for both would interleave their cells, shifting every row
            raise DataError(f"{path} names the column {name!r} twice in its header: rename one of them")
    columns: dict = {name: [] for name in header}
    places = []
    end = reader.line_num
    for row in reader:
        # A quoted cell may hold line breaks: a record is named by its first line (where an unclosed quote is).
        start, end = end + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines between records carry nothing
        place = f"line {start}" if start == end else f"line {start} (to line {end})"
        if any(cell.strip() for cell in row[len(header):]):  # empty trailing cells ("a,b,") carry nothing
            sign = "a comma" if delimiter == "," else "a tab"
            raise DataError(f"{path} {place} has {len(row)} cells but the header names {len(header)} "
                            f"columns: put a cell that holds {sign} in double quotes, or name every column")
        for index, name in enumerate(header):
            columns[name].append(row[index] if index < len(row) else None)
        places.append(place)
    return Table(path, columns, places)


def _read_jsonl(path: str) -> Table:
    with open(path, "rb") as file:
        data = file.read()
    _no_nul(path, data)
    columns: dict = {}
    places = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"{path} line {number} holds bytes that are not UTF-8 "
                            f"({raw[error.start:error.start + 1]!r}): save the file as UTF-8") from error
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not valid JSON ({error.msg}): one JSON object per line") from error
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} is a JSON {type(record).__name__}, not an object: one "
                            f"{{\"column\": value}} object per line")
        for name in record:
            if name not in columns:
                columns[name] = [None] * len(places)  # a column first seen late is absent from earlier rows
        for name, values in columns.items():
            values.append(record.get(name))
        places.append(f"line {number}")
    return Table(path, columns, places)


def _pyarrow(what: str):
    try:
        import pyarrow
    except ImportError as error:
        raise DataError(f"reading {what} needs pyarrow: pip install pyarrow") from error
    return pyarrow


def _from_arrow(path: str, tables: Sequence, names: Sequence[str]) -> Table:
    """One Table from pyarrow tables read from the files `names` (rows numbered per file)."""
    columns: dict = {}
    places = []
    for table, name in zip(tables, names):
        for column in table.column_names:
            if column not in columns:
                columns[column] = [None] * len(places)
        for column, values in columns.items():
            values.extend(table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows)
        where = f" of {name}" if len(names) > 1 else ""
        places.extend(f"row {row + 1}{where}" for row in range(table.num_rows))
    return Table(path, columns, places)


def _read_parquet(path: str, shards: Sequence[str]) -> Table:
    _pyarrow("Parquet files")
    import pyarrow.parquet as parquet

    tables = []
    for shard in shards:
        try:
            tables.append(parquet.read_table(shard))
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not Parquet"
            raise DataError(f"{shard} is not a readable Parquet file ({error}): check the file") from error
    return _from_arrow(path, tables, [os.path.basename(shard) for shard in shards])


def _read_saved_dataset(path: str) -> Table:
    """A `datasets.Dataset.save_to_disk` folder: Arrow stream files listed in state.json, and the
    label names of ClassLabel features in dataset_info.json."""
    pyarrow = _pyarrow("a save_to_disk folder")
    state_path = os.path.join(path, "state.json")
    files = []
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as file:
            files = [entry["filename"] for entry in json.load(file).get("_data_files", [])]
    files = files or sorted(name for name in os.listdir(path) if name.endswith(".arrow"))
    tables = []
    for name in files:
        full = os.path.join(path, name)
        try:
            # `datasets` writes the Arrow IPC stream format; other writers use the file format.
            with pyarrow.memory_map(full) as source:
                tables.append(pyarrow.ipc.open_stream(source).read_all())
        except Exception:
            try:
                with pyarrow.memory_map(full) as source:
                    tables.append(pyarrow.ipc.open_file(source).read_all())
            except Exception as error:
                raise DataError(f"{full} is not a readable Arrow file ({error}): save the dataset again with "
                                f"save_to_disk") from error
    table = _from_arrow(path, tables, files)
    info_path = os.path.join(path, "dataset_info.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as file:
            features = json.load(file).get("features", {}) or {}
        for column, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                table.class_names[column] = list(feature["names"])
    return table


def resolve_split(path: str, split: str) -> str:
    """A DatasetDict folder (dataset_dict.json) stands for its `split` subfolder."""
    index = os.path.join(path, "dataset_dict.json")
    if os.path.isdir(path) and os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            splits = list(json.load(file).get("splits", []))
        if split not in splits:
            raise DataError(f"{path} holds the splits {', '.join(splits)} but not {split!r}: point data.train / "
                            f"data.test at one split folder")
        return os.path.join(path, split)
    return path


def has_split(path: str, split: str) -> bool:
    index = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(index):
        return False
    with open(index, encoding="utf-8") as file:
        return split in json.load(file).get("splits", [])


def read_table(path: str, split: str = "train") -> Table:
    """The rows of a CSV/TSV/JSONL/Parquet file, a folder of Parquet shards, or a save_to_disk folder."""
    if not path:
        raise DataError("no data file given: set --config.data.train=PATH (CSV, TSV, JSONL or Parquet)")
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist: check data.train / data.test")
    path = resolve_split(path, split)
    table = _read_any(path)
    if not len(table):
        raise DataError(f"{path} has no rows: it needs a header line and at least one record")
    return table


def _read_any(path: str) -> Table:
    if os.path.isdir(path):
        names = os.listdir(path)
        if "state.json" in names or any(name.endswith(".arrow") for name in names):
            return _read_saved_dataset(path)
        shards = sorted(os.path.join(path, name) for name in names if name.endswith(".parquet"))
        if shards:
            return _read_parquet(path, shards)
        raise DataError(f"folder {path} holds no .parquet shards and no save_to_disk dataset (.arrow with "
                        f"state.json): point data.train at a file or such a folder")
    extension = os.path.splitext(path)[1].lower()
    kind = FORMATS.get(extension)
    if kind is None:
        raise DataError(f"unknown data format {extension or '(no extension)'!r} of {path}: use .csv, .tsv, .jsonl "
                        f"or .parquet (or a folder of Parquet shards, or a save_to_disk folder)")
    if kind == "parquet":
        return _read_parquet(path, [path])
    if kind == "jsonl":
        return _read_jsonl(path)
    return _read_delimited(path, "," if kind == "csv" else "\t")


# ---------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    """None or NaN (JSON's NaN, a Parquet float column's gap): no value, not the text "nan"."""
    return value is None or isinstance(value, float) and value != value


def _one_value(table: Table, value: Any, place: str, what: str, column: str) -> None:
    """A list or an object (JSONL, Parquet list/struct columns) is refused: str() would make its Python
    repr the text, or a set of labels one class of its own."""
    if isinstance(value, (list, tuple, dict)):
        kind = "an object" if isinstance(value, dict) else "a list"
        fix = "give one label per row (multi-label rows are not supported)" if what == "label" else \
            f"give one string per row (join the parts into one {what})"
        raise DataError(f"{table.path} {place} has {kind} as its {what} (column {column!r}): {fix}")


def _texts(table: Table, column: str, option: str, what: str = "text") -> list[str]:
    """The column as non-empty strings; an empty one names its row."""
    values = table.column(column, option)
    out = []
    for value, place in zip(values, table.places):
        _one_value(table, value, place, what, column)
        text = "" if _missing(value) else str(value).strip()
        if not text:
            raise DataError(f"{table.path} {place} has an empty {what} (column {column!r}): fill it in or drop the row")
        out.append(text)
    return out


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+\.0*")  # "3.0", "3.": a float column written out as text


def _label(value: Any) -> str:
    """A label as the string it names: 3, 3.0, "3" and "3.0" are one class (CSV has only strings, and a
    float column written to CSV reads "3.0" where Parquet or JSON give 3.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text.split(".")[0])) if _WHOLE_NUMBER.fullmatch(text) else text


def _labels(table: Table, column: str, option: str) -> list[str]:
    values = table.column(column, option)
    names = table.class_names.get(column)
    out = []
    for value, place in zip(values, table.places):
        _one_value(table, value, place, "label", column)
        if _missing(value) or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{table.path} {place} has an empty label (column {column!r}): fill it in or drop the row")
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            value = names[value]  # a ClassLabel stores the index of its name
        out.append(_label(value))
    return out


def sorted_names(names) -> list[str]:
    """Label names in a stable order: numerically when every name is an integer, else as strings."""
    names = list(set(names))
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _held_out(keys: Sequence[str], fraction: float, seed: int, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded `fraction` of every key (class, or task/class) held out."""
    names = sorted(set(keys))
    codes = {key: code for code, key in enumerate(names)}
    return holdout(np.asarray([codes[key] for key in keys], np.int64), float(fraction), int(seed),
                   [name.replace("\0", "/") for name in names], where)


def _pick(values: list, rows: np.ndarray) -> list:
    return [values[int(row)] for row in rows]


# ---------------------------------------------------------------------------------------------------
# text classification
# ---------------------------------------------------------------------------------------------------

def files_stream(tokenizer, train: str, test: str = "", text_column: str = "text", label_column: str = "label",
                 task_column: str = "", num_tasks: int = 5, classes_per_task: int = 0, test_fraction: float = 0.2,
                 max_len: int = 64, seed: int = 0) -> Stream:
    """A classification Stream from labelled text files.

    Class-incremental (no `task_column`): the classes of the training file, in a seeded order, cut into
    `num_tasks` tasks (or tasks of `classes_per_task`). Task-incremental (`task_column`): one task per
    distinct value, in order of first appearance in the training file, each with its own classes
    (named "task/label"; the same label in two tasks is two classes). Inputs [N, max_len].
    """
    for value, option in ((train, "train"), (test, "test")):
        if not isinstance(value, str):
            raise DataError(f"data.{option} must be one path for data.name=files, got {value!r}: several files are "
                            f"data.name=sequence with one source per file")
    train_table = read_table(train, "train")
    test_table = None
    if test:
        test_table = read_table(test, "test")
    elif has_split(train, "test"):
        test_table = read_table(train, "test")
    texts = _texts(train_table, text_column, "text_column")
    labels = _labels(train_table, label_column, "label_column")
    tasks = _texts(train_table, task_column, "task_column", "task") if task_column else None
    if test_table is not None:
        test_texts = _texts(test_table, text_column, "text_column")
        test_labels = _labels(test_table, label_column, "label_column")
        test_tasks = _texts(test_table, task_column, "task_column", "task") if task_column else None
        known = set(zip(tasks, labels)) if tasks else set(labels)
        for index, place in enumerate(test_table.places):
            key = (test_tasks[index], test_labels[index]) if tasks else test_labels[index]
            if key not in known:
                what = f"task {key[0]!r} label {key[1]!r}" if tasks else f"label {key!r}"
                raise DataError(f"{test_table.path} {place} has {what}, which the training file {train_table.path} "
                                f"lacks: every test class needs training examples (fix the label or add them)")
    else:
        keys = [f"{t}\0{l}" for t, l in zip(tasks, labels)] if tasks else labels
        counts = collections.Counter(keys)
        for task in dict.fromkeys(tasks or ()):
            if all(count < 2 for key, count in counts.items() if key.split("\0", 1)[0] == task):
                raise DataError(f"task {task!r} (column {task_column!r}) has no test examples to hold out: each of "
                                f"its classes has 1 example in {train_table.path}; add examples or give data.test")
        train_rows, test_rows = _held_out(keys, test_fraction, seed, f" in {train_table.path}")
        test_texts, test_labels = _pick(texts, test_rows), _pick(labels, test_rows)
        test_tasks = _pick(tasks, test_rows) if tasks else None
        texts, labels = _pick(texts, train_rows), _pick(labels, train_rows)
        tasks = _pick(tasks, train_rows) if tasks else None
    name = f"files:{os.path.basename(os.path.normpath(train))}"
    metadata = {"train": train, "test": test or f"{train} (held out {test_fraction:.0%})", "max_len": max_len,
                "text_column": text_column, "label_column": label_column, "task_column": task_column}
    train_inputs = tokenize_classification(texts, tokenizer, max_len)
    test_inputs = tokenize_classification(test_texts, tokenizer, max_len)
    if not task_column:
        class_names = sorted_names(labels)
        ids = {label: index for index, label in enumerate(class_names)}
        train_split = Split(inputs=train_inputs, labels=np.asarray([ids[l] for l in labels], np.int32), texts=texts)
        test_split = Split(inputs=test_inputs, labels=np.asarray([ids[l] for l in test_labels], np.int32),
                           texts=test_texts)
        return class_incremental(name, train_split, test_split, class_names, num_tasks, seed, metadata=metadata,
                                 classes_per_task=classes_per_task)
    task_order = list(dict.fromkeys(tasks))
    class_names, ids = [], {}
    for task in task_order:
        for label in sorted_names(l for t, l in zip(tasks, labels) if t == task):
            ids[(task, label)] = len(class_names)
            class_names.append(f"{task}/{label}")
    train_ids = np.asarray([ids[key] for key in zip(tasks, labels)], np.int32)
    test_ids = np.asarray([ids[key] for key in zip(test_tasks, test_labels)], np.int32)
    stream_tasks = []
    for index, task in enumerate(task_order):
        parts = []
        for ids_, task_values, inputs, split_texts, which in (
                (train_ids, tasks, train_inputs, texts, "training"),
                (test_ids, test_tasks, test_inputs, test_texts, "test")):
            rows = np.flatnonzero(np.asarray([value == task for value in task_values], bool))
            if not len(rows):
                raise DataError(f"task {task!r} (column {task_column!r}) has no {which} examples"
                                f"{' in ' + test_table.path if test_table is not None and which == 'test' else ''}: "
                                f"add some, or raise data.test_fraction")
            parts.append(Split(inputs={k: v[rows] for k, v in inputs.items()}, labels=ids_[rows],
                               texts=_pick(split_texts, rows)))
        classes = tuple(sorted({int(c) for c in parts[0].labels}))
        stream_tasks.append(Task(index=index, name=task, train=parts[0], test=parts[1], classes=classes))
    return Stream(name=name, kind="classification", tasks=stream_tasks, num_classes=len(class_names),
                  class_names=tuple(class_names), class_order=tuple(range(len(class_names))), metadata=metadata)


# ---------------------------------------------------------------------------------------------------
# instruction tasks
# ---------------------------------------------------------------------------------------------------

def paths(value, option: str = "data.train") -> list[str]:
    """A list of paths from a list, or a comma-separated string (`--config.data.train=a.jsonl,b.jsonl`,
    also written "[a.jsonl,b.jsonl]")."""
    if value is None:
        return []
    if not isinstance(value, (str, list, tuple)):
        raise DataError(f"{option} must be a name or a list of names, got {value!r}")
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = str(item).strip()
        if item.startswith("[") and item.endswith("]"):
            item = item[1:-1]
        out += [part.strip().strip("'\"") for part in item.split(",") if part.strip().strip("'\"")]
    return out


def task_metrics(metrics, task_names: Sequence[str]) -> list[str]:
    """One metric per task from a single name, a list (one per task) or a mapping task -> metric
    (tasks it leaves out are scored by accuracy)."""
    from jaxtree_lora.evaluation.task_metrics import METRICS

    if metrics is None or metrics == "" or metrics == []:
        chosen = ["accuracy"] * len(task_names)
    elif hasattr(metrics, "items"):
        unknown = [name for name in metrics if name not in task_names]
        if unknown:
            raise DataError(f"data.metrics names task(s) {', '.join(unknown)} that the stream lacks (its tasks: "
                            f"{', '.join(task_names)})")
        chosen = [str(metrics.get(name, "accuracy")) for name in task_names]
    else:
        listed = paths(metrics, "data.metrics")
        if len(listed) == 1:
            listed = listed * len(task_names)
        if len(listed) != len(task_names):
            raise DataError(f"data.metrics lists {len(listed)} metrics for {len(task_names)} tasks: give one per task, "
                            f"one for all, or a mapping task -> metric")
        chosen = listed
    bad = [name for name in chosen if name not in METRICS]
    if bad:
        raise DataError(f"unknown metric {bad[0]!r} in data.metrics: choose from {', '.join(METRICS)}")
    return chosen


def _task_name(path: str) -> str:
    stem = os.path.basename(os.path.normpath(path))
    return os.path.splitext(stem)[0] if not os.path.isdir(path) else stem


def instruction_files_stream(tokenizer, train, test=None, prompt_column: str = "prompt",
                             answer_column: str = "answer", metrics=None, test_fraction: float = 0.2, seed: int = 0,
                             max_prompt_len: int = 512, max_answer_len: int = 64,
                             chat_template: bool = False) -> Stream:
    """An instruction Stream: one task per training file (CSV, TSV, JSONL, Parquet), in order, named
    by the file's stem; `test` lists one test file per task, or none for a seeded held-out
    `test_fraction`. Each task's generation budget is its longest training answer (tokens, with EOS),
    at most max_answer_len. Arrays are padded to one length across tasks (one compiled step)."""
    train_paths, test_paths = paths(train, "data.train"), paths(test, "data.test")
    if not train_paths:
        raise DataError("data.train names no task files: --config.data.train=task1.jsonl,task2.jsonl")
    if test_paths and len(test_paths) != len(train_paths):
        raise DataError(f"data.test lists {len(test_paths)} files for {len(train_paths)} training files: give one "
                        f"test file per task, or none to hold out data.test_fraction")
    names = [_task_name(p) for p in train_paths]
    names = [name if names.count(name) == 1 else f"{name}#{index}" for index, name in enumerate(names)]
    chosen_metrics = task_metrics(metrics, names)
    stream_tasks = []
    for index, (name, path) in enumerate(zip(names, train_paths)):
        table = read_table(path, "train")
        prompts = _texts(table, prompt_column, "prompt_column", "prompt")
        answers = _texts(table, answer_column, "answer_column", "answer")
        if test_paths:
            test_table = read_table(test_paths[index], "test")
            test_prompts = _texts(test_table, prompt_column, "prompt_column", "prompt")
            test_answers = _texts(test_table, answer_column, "answer_column", "answer")
        else:
            if len(prompts) < 2:
                raise DataError(f"task {name!r} ({path}) has {len(prompts)} example(s), too few to hold out a test "
                                f"set: add examples or give data.test files")
            train_rows, test_rows = _held_out(["task"] * len(prompts), test_fraction, seed + index)
            test_prompts, test_answers = _pick(prompts, test_rows), _pick(answers, test_rows)
            prompts, answers = _pick(prompts, train_rows), _pick(answers, train_rows)
        budget = min(max(len(ids) for ids in answer_token_ids(answers, tokenizer)), max_answer_len)
        splits = [Split(prompts=p, answers=a, arrays=tokenize_instruction(p, a, tokenizer, max_prompt_len,
                                                                         max_answer_len, chat_template))
                  for p, a in ((prompts, answers), (test_prompts, test_answers))]
        stream_tasks.append(Task(index=index, name=name, train=splits[0], test=splits[1],
                                 metric=chosen_metrics[index], max_new_tokens=int(budget)))
    pad = pad_id(tokenizer)
    pad_to_common_length(stream_tasks, int(pad))
    return Stream(name="instruction_files", kind="instruction", tasks=stream_tasks,
                  metadata={"train": train_paths, "test": test_paths or f"held out {test_fraction:.0%}",
                            "max_prompt_len": max_prompt_len, "max_answer_len": max_answer_len,
                            "chat_template": chat_template})


# ---------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------

def _images_under(folder: str) -> list[str]:
    """Sorted image paths in `folder` and its subfolders, as torchvision's ImageFolder finds them
    (root/<class>/batch2/x.jpg is of <class>); hidden folders (.ipynb_checkpoints) and files (macOS's
    ._x.jpg resource forks, which are no images) skipped."""
    found = []
    for where, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [os.path.join(where, name) for name in files
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(found)


def _class_folders(root: str) -> dict:
    """class name -> sorted image paths under root/<class>/ (ImageFolder's layout)."""
    classes = sorted(name for name in os.listdir(root)
                     if not name.startswith(".") and os.path.isdir(os.path.join(root, name)))
    if not classes:
        raise DataError(f"{root} has no class subfolders: lay images out as {root}/<class>/<image>.jpg")
    out = {}
    for name in classes:
        folder = os.path.join(root, name)
        images = _images_under(folder)
        if not images:
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        out[name] = images
    return out


def _eight_bit(image, path: str):
    """A 16-bit grey image (PIL modes I;16*, and I or F holding 0..65535) or a float one in [0, 1] (mode F)
    as 8-bit grey: PIL's convert clips at 255, turning most of a 16-bit image white and a [0, 1] one black."""
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.asarray(image, np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"{path} holds grey values outside 0..65535 (PIL mode {image.mode}): save it as an 8- or "
                        f"16-bit image")
    if image.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    elif image.mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0  # a float image in [0, 1] (TIFF), as data.image_dtype=float32 gives them
    return Image.fromarray(np.rint(values).astype(np.uint8), "L")


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: any mode converted to RGB (16-bit greys scaled), resized bilinearly."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = _eight_bit(image, path).convert("RGB")
            if size and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable image ({error}): remove or replace it") from error


TEST_FOLDERS = ("test", "val", "validation")  # beside root/train, the first found is tested on


def image_folder_stream(root: str = "", train: str = "", test: str = "", image_size: int = 224, num_tasks: int = 5,
                        classes_per_task: int = 0, seed: int = 0, test_fraction: float = 0.2,
                        image_dtype: str = "uint8") -> Stream:
    """A class-incremental image Stream from class-per-subfolder folders: `root`/train and `root`/test
    (else `root`/val or `root`/validation; or `train` and `test` given directly), or one `root` of
    class folders with a seeded held-out `test_fraction`. Images [N, image_size, image_size, 3] uint8
    (or float32 in [0, 1]), as the tfds source gives them, so the ViT path consumes them the same way."""
    if image_dtype not in ("uint8", "float32"):
        raise DataError(f"data.image_dtype {image_dtype!r} must be 'uint8' or 'float32'")
    for value, option in ((root, "data_dir"), (train, "train"), (test, "test")):
        if not isinstance(value, str):
            raise DataError(f"data.{option} must be one folder for data.name=image_folder, got {value!r}")
    if image_size < 1:
        raise DataError(f"data.image_size must be >= 1 (the ViT's input size), got {image_size}")
    if not train:
        if not root or not os.path.isdir(root):
            raise DataError(f"image folder {root!r} is not a directory: set --config.data.data_dir (root/<class>/*.jpg, "
                            f"or root/train/<class>/ and root/test/<class>/)")
        if os.path.isdir(os.path.join(root, "train")):
            train = os.path.join(root, "train")
            # ImageNet's layout names the held-out folder val/: tested on, not left aside unread.
            tested = [os.path.join(root, name) for name in TEST_FOLDERS if os.path.isdir(os.path.join(root, name))]
            test = test or (tested[0] if tested else "")
        else:
            train = root
    for folder in (train, test):
        if folder and not os.path.isdir(folder):
            raise DataError(f"image folder {folder} does not exist: check data.train / data.test / data.data_dir")
    train_classes = _class_folders(train)
    class_names = list(train_classes)
    ids = {name: index for index, name in enumerate(class_names)}

    def load(classes: dict) -> tuple[np.ndarray, np.ndarray]:
        images = [load_image(path, image_size) for name in classes for path in classes[name]]
        labels = [ids[name] for name in classes for _ in classes[name]]
        return np.stack(images), np.asarray(labels, np.int32)

    train_images, train_labels = load(train_classes)
    if test:
        test_classes = _class_folders(test)
        extra = [name for name in test_classes if name not in ids]
        if extra:
            raise DataError(f"test class folder(s) {', '.join(extra)} in {test} have no training folder in {train}: "
                            f"every test class needs training images")
    train_images, train_labels, test_images, test_labels = image_splits(
        train_images, train_labels, load(test_classes) if test else None, test_fraction, seed, image_dtype,
        class_names, f" in {train}")
    return class_incremental(
        f"image_folder:{os.path.basename(os.path.normpath(root or train))}",
        Split(inputs={"images": train_images}, labels=train_labels),
        Split(inputs={"images": test_images}, labels=test_labels), class_names, num_tasks, seed,
        metadata={"train": train, "test": test or f"{train} (held out {test_fraction:.0%})",
                  "image_size": image_size}, classes_per_task=classes_per_task)


# ---------------------------------------------------------------------------------------------------
# sequences across sources
# ---------------------------------------------------------------------------------------------------



def parse_sources(value) -> list[dict]:
    """data.sources as a list of dicts: ml_collections lists, or JSON text from the command line."""
    if isinstance(value, str):
        value = [value]
    if value is not None and not isinstance(value, (list, tuple)):
        raise DataError(f"data.sources must be a list of data configs (or JSON text of one), got {value!r}: write "
                        f"--config.data.sources='[{{\"name\": \"files\", \"train\": \"a.csv\"}}]'")
    sources = []
    for item in list(value or []):
        if isinstance(item, str):
            try:
                parsed = json.loads(item)
            except json.JSONDecodeError as error:
                raise DataError(f"data.sources is not valid JSON ({error.msg}): write "
                                f"--config.data.sources='[{{\"name\": \"files\", \"train\": \"a.csv\"}}]'") from error
            sources += parsed if isinstance(parsed, list) else [parsed]
        else:
            sources.append(item)
    out = []
    for index, source in enumerate(sources):
        if hasattr(source, "to_dict"):
            source = source.to_dict()
        if not isinstance(source, dict) or not source.get("name"):
            raise DataError(f"data.sources[{index}] must be a dict with a 'name' (files, instruction_files, "
                            f"image_folder, trace, ...), got {source!r}")
        out.append(dict(source))
    if not out:
        raise DataError("data.name=sequence needs data.sources: a list of sources, e.g. "
                        "[{\"name\": \"files\", \"train\": \"a.csv\"}, {\"name\": \"files\", \"train\": \"b.csv\"}]")
    return out


def sequence_stream(configs: list[dict], tokenizer, get_stream) -> Stream:
    """The tasks of every source, in order, as one Stream: `configs` are the sources' data configs
    (`sources.source_configs` of data.sources: name, files, columns; one task by default, with the
    inherited settings of the top-level data config), each built with `get_stream`. Classification sources keep disjoint label spaces:
    each source's class ids are offset by the classes before it. Instruction sources' tasks are
    concatenated and padded to one length. Classification and instruction sources cannot share one
    stream: the trainer learns either a class head or generated answers per run.
    """
    streams = []
    for index, merged in enumerate(configs):
        source = merged
        try:
            streams.append(get_stream(merged, tokenizer))
        except DataError as error:
            raise DataError(f"data.sources[{index}] ({source['name']}): {error}") from error
    kinds = {stream.kind for stream in streams}
    if len(kinds) > 1:
        by_kind = ["{}: {}".format(kind, ", ".join(s.name for s in streams if s.kind == kind)) for kind in sorted(kinds)]
        raise DataError("data.sources mixes classification and instruction sources "
                        f"({'; '.join(by_kind)}): the trainer learns one "
                        f"kind per stream (a class head, or generated answers), so run them as two streams")
    name = "sequence(" + "+".join(stream.name for stream in streams) + ")"
    tasks = []
    if streams[0].kind == "instruction":
        for stream in streams:
            for task in stream.tasks:
                tasks.append(dataclasses.replace(task, index=len(tasks)))
        pad = pad_id(tokenizer)
        pad_to_common_length(tasks, int(pad))
        return Stream(name=name, kind="instruction", tasks=tasks,
                      metadata={"sources": [s.name for s in streams]})
    stream_names = [stream.name for stream in streams]
    # Sources read from files of one name are told apart by their place in data.sources.
    tags = [name if stream_names.count(name) == 1 else f"{name}#{index}" for index, name in enumerate(stream_names)]
    for key in set().union(*(stream.tasks[0].train.inputs for stream in streams)):
        shapes = {tag: stream.tasks[0].train.inputs[key].shape[1:] for tag, stream in zip(tags, streams)
                  if key in stream.tasks[0].train.inputs}
        if len(shapes) != len(streams) or len(set(shapes.values())) > 1:
            raise DataError(f"data.sources give inputs {key!r} of different shapes {shapes}: set max_len / "
                            f"image_size once at the data level, not per source, and do not mix text and images")
    all_names = [n for stream in streams for n in stream.class_names]
    clash = len(set(all_names)) != len(all_names)
    class_names, order, offset = [], [], 0
    for tag, stream in zip(tags, streams):
        # The same label in two sources is two classes; the names say which source each one is from.
        class_names += [f"{tag}/{n}" if clash else str(n) for n in stream.class_names]
        order += [offset + int(c) for c in stream.class_order]
        for task in stream.tasks:
            moved = [Split(inputs=split.inputs, labels=np.asarray(split.labels, np.int32) + offset, texts=split.texts)
                     for split in (task.train, task.test)]
            tasks.append(dataclasses.replace(task, index=len(tasks), train=moved[0], test=moved[1],
                                             classes=tuple(offset + int(c) for c in task.classes)))
        offset += stream.num_classes
    return Stream(name=name, kind="classification", tasks=tasks, num_classes=offset, class_names=tuple(class_names),
                  class_order=tuple(order), metadata={"sources": [s.name for s in streams]})
