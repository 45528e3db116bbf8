"""The method a run trains, built from its config: one function for the run, `validate`, the memory
planner and everything that rebuilds a run from its config.json (export, experiments).

What the user chose is read from the config alone: `config.method.NAME.OPTION` and `config.lora.KEY`
are None (placeholders) until something sets them (a config file, a `--config.` override, a
program). A set key always wins, whatever its value and whatever form the method takes on the
stream; an unset one takes the method's own default, which may depend on the form (TreeLoRA on a
classification stream: HiDe-LoRA's LoRA spec, lam 0.1, tree depth 5). Whether a key was set is never
told by comparing its value with a default.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxtree_lora import lora as lora_lib
from jaxtree_lora import methods as methods_lib
from jaxtree_lora.data import sources as data_sources
from jaxtree_lora.errors import ConfigError

LORA_KEYS = ("targets", "rank", "alpha", "dropout", "init", "max_modules")
# Fields of a method that the run sets, never the user.
RUN_FIELDS = ("lora", "max_tasks")
# The kind of stream each data source gives ("sequence": its sources'), from the data registry.
STREAM_KINDS = {name: cls.kind for name, cls in data_sources.SOURCES.items() if cls.kind}


def _as_dict(node) -> dict:
    return dict(node.to_dict() if hasattr(node, "to_dict") else (node or {}))


def given_lora(config) -> dict:
    """The `config.lora` keys the config sets (not None), targets as a tuple."""
    given = {key: value for key, value in _as_dict(config.get("lora", None)).items() if value is not None}
    unknown = sorted(set(given) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"config.lora has no key(s) {', '.join(unknown)}: its keys are {', '.join(LORA_KEYS)}")
    if "targets" in given:
        targets = given["targets"]
        given["targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
    return given


def given_options(config, name: str) -> dict:
    """The options of method `name` that the config sets (not None) under config.method.NAME, lists as
    tuples; an option the method lacks is refused with the list of its options."""
    fields = {field.name for field in dataclasses.fields(methods_lib.get_class(name))}
    options = _as_dict(config.method.get(name, None))
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {', '.join(unknown)} (under config.method.{name}); "
                          f"its options are: {', '.join(sorted(fields - set(RUN_FIELDS)))}")
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in options.items() if value is not None and key not in RUN_FIELDS}


def lora_spec_for(config, cls) -> lora_lib.LoraSpec:
    """The method's own LoRA spec (its dataclass default) with the keys the config sets on top: InfLoRA
    trains k and v at rank 10, SD-LoRA q and v at rank 10, the LLM baselines q and v at rank 8 with
    dropout 0.1, and so on, unless `config.lora.KEY` says otherwise (for every method of the run)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    own = fields["lora"].default if fields["lora"].default is not dataclasses.MISSING else lora_lib.LoraSpec()
    return dataclasses.replace(own, **given_lora(config))


def build_method(config, max_tasks: int):
    """The method named by config.method.name with the options the config sets and its LoRA spec
    (`lora_spec_for`), before any stream-dependent form is chosen (`method_from_config` chooses it)."""
    name = config.method.name
    cls = methods_lib.get_class(name)
    fields = {field.name for field in dataclasses.fields(cls)}
    options = given_options(config, name)
    if "lora" in fields:
        options["lora"] = lora_spec_for(config, cls)
    if "max_tasks" in fields:
        options["max_tasks"] = max_tasks
    return cls(**options)


def stream_kind(data) -> Optional[str]:
    """"classification" or "instruction": the kind of stream a data config describes, from the config
    alone; None where it cannot be told (an unknown source, sources of both kinds)."""
    return data_sources.stream_kind(data)


def method_from_config(config, kind: Optional[str], max_tasks: int):
    """The concrete method a run of `config` on a stream of `kind` trains: `build_method`, then, for a
    method whose form depends on the stream (`for_stream`, TreeLoRA's form "auto"), that form, given
    which of its options and LoRA keys the config sets. kind None (not known from the config): the
    method before its form is chosen."""
    method = build_method(config, max_tasks)
    if kind is None or not hasattr(method, "for_stream"):
        return method
    given = frozenset(given_options(config, config.method.name)) | frozenset(f"lora.{key}" for key in given_lora(config))
    return method.for_stream(kind, given, lambda name: given_options(config, name))
