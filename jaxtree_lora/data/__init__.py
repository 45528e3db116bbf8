"""Streams of tasks from real data: offline package data, TRACE directories, prepared tfds datasets,
and the user's own files (files.py).

    stream = get_stream(config.data, tokenizer)

`config.data.name` picks the source; each source's options, their defaults and one line of help
each, are its dataclass in sources.py (the registry; README.md lists them). An option left unset
(None) takes the source's default; a key the source lacks is refused in one line.
"""
from __future__ import annotations

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, check_stream, class_incremental  # noqa: F401


def __getattr__(name: str):
    if name == "NAMES":  # the registry's names, imported on use (`python -m jaxtree_lora.data.sources` runs it)
        from jaxtree_lora.data.sources import NAMES

        return NAMES
    raise AttributeError(name)


def get_stream(config, tokenizer=None) -> Stream:
    """The Stream that `config` (an ml_collections.ConfigDict, or any mapping) describes: its source's
    options (sources.options: unknown keys and values of the wrong type refused), then its builder."""
    from jaxtree_lora.data import sources

    return sources.build(config, tokenizer)


def checked_stream(config, tokenizer=None, vocab_size: int = 0) -> Stream:
    """The stream a run trains on: `get_stream`, then `check_stream` against the model's vocabulary.
    Every problem with the data is a DataError of one line naming the fix (the CLI: exit status 2)."""
    stream = get_stream(config, tokenizer)
    check_stream(stream, vocab_size)
    return stream
