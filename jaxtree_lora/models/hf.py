"""Reading Hugging Face checkpoint directories: config, safetensors (single or sharded), key maps.

A backbone's loader describes its checkpoint as a list of `KeyRule`s: a regular expression over the
Hugging Face tensor name, the destination path in the backbone's (stacked) parameter tree, and a
transform. `map_checkpoint` applies the rules, stacks per-layer tensors along a new leading axis,
checks every shape against the backbone's expected shapes, and reports all problems at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint this loader does not understand (the message says what and how to fix it)."""


def read_config(directory: str):
    """The directory's `config.json` through transformers' AutoConfig (no torch needed)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in {directory}: point to a Hugging Face checkpoint directory")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read {path} with transformers' AutoConfig: {error}") from error


def make_config(cls, **values):
    """`cls(**values)` for values read from a config.json; the ValueError of a shape the backbone cannot
    run (heads that do not divide the width, ...) becomes a CheckpointError saying where it came from."""
    try:
        return cls(**values)
    except ValueError as error:
        raise CheckpointError(f"config.json describes a {cls.__name__} this backbone cannot build: {error}") from error


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: from `model.safetensors.index.json` if sharded."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        except (ValueError, AttributeError, TypeError) as error:  # not JSON, or no {name: file} weight_map
            raise CheckpointError(f"cannot read {index} ({type(error).__name__}: {error}): copy it again from "
                                  "the model's repository") from error
        missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"{index} names shards that are absent: {', '.join(missing)}")
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if found:
        return [os.path.join(directory, name) for name in found]
    raise CheckpointError(
        f"no *.safetensors in {directory}: convert the checkpoint to safetensors (PyTorch .bin is not read)")


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 is widened to float32)."""
    from safetensors import safe_open

    tensors = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as error:  # safetensors raises SafetensorError (and others) for a damaged file
            raise CheckpointError(f"cannot read {path} ({type(error).__name__}: {error}): the file is damaged or "
                                  "incomplete; download or save it again") from error
    return tensors


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Maps Hugging Face tensors to one parameter of the backbone.

    pattern: regex over the HF name; a group named `layer` marks a per-layer tensor that is stacked
      along a new leading axis in layer order.
    target: destination path in the backbone's parameter dict, e.g. ("layers", "q_proj").
    transform: applied to each tensor before stacking (transpose, reshape, ...).
    """

    pattern: str
    target: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x


def map_checkpoint(tensors: Mapping[str, np.ndarray], rules: Sequence[KeyRule],
                   expected: Mapping[tuple[str, ...], tuple[int, ...]], num_layers: int,
                   ignore: Iterable[str] = (), optional: Iterable[tuple[str, ...]] = ()) -> dict:
    """Applies `rules` to `tensors` and returns `{target: np.ndarray}` with shapes checked.

    Args:
      expected: target -> expected shape (stacked targets include the leading layer axis).
      ignore: regexes of HF names that are known and deliberately unused (e.g. a pooler).
      optional: targets that may be absent (e.g. an lm_head tied to the embeddings).
    Raises CheckpointError listing unknown names, missing targets and shape mismatches together.
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    ignored = [re.compile(p) for p in ignore]
    per_layer: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    single: dict[tuple[str, ...], np.ndarray] = {}
    unknown = []
    for name, value in tensors.items():
        matched = False
        for regex, rule in compiled:
            m = regex.fullmatch(name)
            if m is None:
                continue
            matched = True
            array = rule.transform(np.asarray(value))
            if "layer" in regex.groupindex:
                per_layer.setdefault(rule.target, {})[int(m.group("layer"))] = array
            else:
                single[rule.target] = array
            break
        if not matched and not any(r.fullmatch(name) for r in ignored):
            unknown.append(name)
    problems = []
    if unknown:
        problems.append("unknown tensors: " + ", ".join(sorted(unknown)[:8])
                        + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    out = dict(single)
    for target, layers in per_layer.items():
        missing = [i for i in range(num_layers) if i not in layers]
        extra = [i for i in layers if i >= num_layers]
        if missing or extra:
            problems.append(f"{'.'.join(target)}: layers {missing or extra} do not match num_layers={num_layers}")
            continue
        shapes = {tuple(layers[i].shape) for i in range(num_layers)}
        if len(shapes) > 1:
            expected_layer = tuple(expected.get(target, (None,))[1:])
            wrong = [i for i in range(num_layers) if tuple(layers[i].shape) != expected_layer]
            problems.append(f"{'.'.join(target)} of layers {wrong} has shape "
                            f"{tuple(layers[wrong[0]].shape) if wrong else sorted(shapes)}, expected {expected_layer}")
            continue
        out[target] = np.stack([layers[i] for i in range(num_layers)])
    optional = set(optional)
    for target, shape in expected.items():
        if target not in out:
            if target in per_layer:
                continue  # already reported
            if target not in optional:
                problems.append(f"missing {'.'.join(target)}")
            continue
        if tuple(out[target].shape) != tuple(shape):
            problems.append(f"{'.'.join(target)} has shape {tuple(out[target].shape)}, expected {tuple(shape)}")
    if problems:
        raise CheckpointError("checkpoint does not fit this backbone: " + "; ".join(problems))
    return out


def to_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """Casts floating arrays (float16/bfloat16/float32) to `dtype`; leaves integer arrays alone."""
    if np.issubdtype(array.dtype, np.integer):
        return array
    return array.astype(dtype)


def nested_set(tree: dict, path: Sequence[str], value) -> None:
    """tree[path[0]][path[1]]... = value, creating dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def optional_file(directory: str, name: str) -> Optional[str]:
    path = os.path.join(directory, name)
    return path if os.path.isfile(path) else None


def assign(model, mapped: Mapping[tuple, np.ndarray], dtype) -> None:
    """Writes mapped numpy arrays ({path of attribute names: array}) into the (abstract) module's
    Params, cast to `dtype`. `device_put`: a host array's transfer (`jnp.asarray` would also compile and
    run an identity program for each new shape)."""
    import jax

    for path, value in mapped.items():
        node = model
        for key in path[:-1]:
            node = getattr(node, key)
        getattr(node, path[-1]).set_value(jax.device_put(to_dtype(np.asarray(value), dtype)))
