"""Loading `ml_collections` config files and applying `--config.key=value` overrides.

A config file defines `get_config(arg: str = "")`; `--config FILE:ARG` passes ARG. Overrides are
typed: the value is parsed as a Python/YAML literal and must fit the type of the key it replaces,
and an unknown key is an error that lists the keys that exist at that level.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "experiments", "configs", "default.py")


class ConfigFileError(ValueError):
    pass


def load(spec: str = "") -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]`; an empty spec loads the default config."""
    spec = spec or DEFAULT_CONFIG
    path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise ConfigFileError(f"config file {path!r} not found: pass --config experiments/configs/NAME.py[:ARG]")
    module_spec = importlib.util.spec_from_file_location(f"_jaxtree_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigFileError(f"config file {path} failed to load: {type(error).__name__}: {error}") from error
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"config file {path} has no get_config(arg) function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as error:
        raise ConfigFileError(f"{path}: get_config({arg!r}) failed: {type(error).__name__}: {error}") from error
    return config


def parse_value(text: str):
    """'3' -> 3, '1e-4' -> 0.0001, 'true' -> True, '[1,2]' -> [1, 2], 'abc' -> 'abc'."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _declared_type(node: ml_collections.ConfigDict, key: str):
    try:
        return node.get_type(key)
    except (AttributeError, KeyError, TypeError):
        return None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `key.sub=value` strings (without the leading `--config.`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigFileError(f"override {item!r} has no value: write --config.{item}=VALUE")
        dotted, text = item.split("=", 1)
        keys = dotted.split(".")
        node = config
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                level = ".".join(keys[:depth]) or "config"
                choices = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise ConfigFileError(f"unknown config key {dotted!r}: {level} has {choices}")
            node = node[key]
        last = keys[-1]
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            choices = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
            raise ConfigFileError(f"unknown config key {dotted!r}: valid keys here are {choices}")
        value = parse_value(text)
        current = node[last]
        # A None default may be a typed placeholder (config_dict.placeholder(list)): coerce to its type.
        kind = type(current) if current is not None else _declared_type(node, last)
        if value is None and isinstance(current, (int, float)) and not isinstance(current, bool):
            # ml_collections lets None replace any value; a number read later (int(), float()) would crash.
            raise ConfigFileError(f"--config.{dotted}={text}: expected a value of type {kind.__name__}, not None")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind in (list, tuple) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        try:
            node[last] = value
        except (TypeError, ValueError) as error:
            reason = " ".join(str(error).split())  # ml_collections' message spans lines; the user gets one
            raise ConfigFileError(
                f"--config.{dotted}={text}: expected a value of type "
                f"{kind.__name__ if kind is not None else type(current).__name__} ({reason})") from error
    return config
