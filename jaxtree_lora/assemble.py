"""The method a run trains, built from its config: one function for the run, `validate`, the memory
planner and everything that rebuilds a run from its config.json (export, experiments).

What the user chose is read from the config alone: `config.method.NAME.OPTION` and `config.lora.KEY`
are None (placeholders) until something sets them (a config file, a `--config.` override, a
program). A set key always wins, whatever its value; an unset one takes the method's own default.
The name `treelora` trains one of TreeLoRA's two forms, chosen here by the stream's kind
(`method_name`), each with its own defaults (the HiDe form: HiDe-LoRA's LoRA spec, lam 0.1, tree
depth 5). Whether a key was set is never told by comparing its value with a default.
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
# The form the name `treelora` trains on each kind of stream, unless config.method.treelora.form names one.
TREELORA_FORMS = {"classification": "treelora_hide", "instruction": "treelora_llm"}
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


def given_options(config, name: str, section: Optional[str] = None) -> dict:
    """The options of method `name` that the config sets (not None) under config.method.SECTION (`name`
    by default), lists as tuples; an option the method lacks is refused with the list of its options."""
    section = section or name
    fields = {field.name for field in dataclasses.fields(methods_lib.get_class(name))}
    options = _as_dict(config.method.get(section, None))
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {', '.join(unknown)} (under config.method.{section}); "
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


def method_name(config, kind: Optional[str]) -> str:
    """The registered method a run of `config` on a stream of `kind` trains: config.method.name, except
    `treelora`, which names one of its forms. Its option `form` ("auto" unless set) picks it: "auto"
    by the stream's kind (TREELORA_FORMS; the LLM form where the kind is not known from the config),
    "llm" or "hide" that form on any stream. This is the one place the choice is made."""
    name = config.method.name
    if name != "treelora":
        return name
    from jaxtree_lora.methods.treelora import FORMS

    form = _as_dict(config.method.get("treelora", None)).get("form", None) or "auto"
    if form == "auto":
        return TREELORA_FORMS.get(kind, "treelora_llm")
    if form not in FORMS:
        raise ConfigError(f"method.treelora.form must be auto, {', '.join(FORMS)}; got {form!r}: "
                          f"set --config.method.treelora.form to one of them")
    return FORMS[form]


def method_options(config, name: str) -> dict:
    """The options the config sets for the registered method `name` the run trains. A form of `treelora`
    run under that name takes `config.method.treelora` (each option must be the form's: one set for the
    other form only is refused, naming both); under its own name, `config.method.NAME`. The HiDe form's
    HiDe-LoRA options left unset there take `config.method.hide_lora`'s, where set."""
    if config.method.name == "treelora" and name != "treelora":
        section = _as_dict(config.method.get("treelora", None))
        section.pop("form", None)
        own = {field.name for field in dataclasses.fields(methods_lib.get_class(name))} - set(RUN_FIELDS)
        foreign = sorted(key for key, value in section.items() if value is not None and key not in own)
        if foreign:
            other = {"treelora_llm": "treelora_hide", "treelora_hide": "treelora_llm"}[name]
            raise ConfigError(f"config.method.treelora.{foreign[0]} is an option of {other} only, and this run trains "
                              f"treelora as {name}: remove it, or run {other} (--config.method.treelora.form="
                              f"{other.split('_')[1]})")
        options = given_options(config, "treelora")
        options = {key: value for key, value in options.items() if key != "form"}
    else:
        options = given_options(config, name)
    if name == "treelora_hide":
        hide = given_options(config, "hide_lora")
        options = {**{key: value for key, value in hide.items() if key != "folded"}, **options}
    return options


def build_method(config, max_tasks: int, kind: Optional[str] = None):
    """The method a run of `config` on a stream of `kind` trains (`method_name`), with the options the
    config sets (`method_options`) and its LoRA spec (`lora_spec_for`); unset options keep the
    method's own defaults, which for the TreeLoRA forms are each form's own."""
    name = method_name(config, kind)
    cls = methods_lib.get_class(name)
    fields = {field.name for field in dataclasses.fields(cls)}
    options = method_options(config, name)
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
    """The concrete method a run of `config` on a stream of `kind` trains (`build_method`): the run,
    `validate`, the memory planner and everything that rebuilds a run from its config.json use it."""
    return build_method(config, max_tasks, kind)
