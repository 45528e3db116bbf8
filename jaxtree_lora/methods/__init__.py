"""Continual-learning methods on one contract (see `base.py`). `get(name, **options)` builds one."""
from __future__ import annotations

import importlib

from jaxtree_lora.methods.base import Method, MethodNotApplicable, ModelInfo, StreamInfo, TaskContext

# name -> "module:Class"; modules are imported on demand so a missing optional piece never breaks the rest.
REGISTRY = {
    "fix": "jaxtree_lora.methods.fix:Fix",
    "joint": "jaxtree_lora.methods.joint:Joint",
    "seqlora": "jaxtree_lora.methods.seqlora:SeqLoRA",
    "inclora": "jaxtree_lora.methods.inclora:IncLoRA",
    # The user-facing name: its options only; a run trains one of its two forms (jaxtree_lora.assemble).
    "treelora": "jaxtree_lora.methods.treelora:TreeLoRA",
    "treelora_llm": "jaxtree_lora.methods.treelora_llm:TreeLoRALLM",
    "treelora_hide": "jaxtree_lora.methods.treelora_hide:TreeLoRAHiDe",
    "o_lora": "jaxtree_lora.methods.o_lora:OLoRA",
    "ewc": "jaxtree_lora.methods.ewc:EWC",
    "inflora": "jaxtree_lora.methods.inflora:InfLoRA",
    "sd_lora": "jaxtree_lora.methods.sd_lora:SDLoRA",
    "c_lora": "jaxtree_lora.methods.c_lora:CLoRA",
    "lilora": "jaxtree_lora.methods.lilora:LiLoRA",
    "loda": "jaxtree_lora.methods.loda:LoDA",
    "cl_lora": "jaxtree_lora.methods.cl_lora:CLLoRA",
    "hide_lora": "jaxtree_lora.methods.hide_lora:HiDeLoRA",
}


# Names that stand for one of several registered methods (chosen by jaxtree_lora.assemble), not a method.
ALIASES = ("treelora",)


class UnknownMethod(ValueError):
    pass


def names() -> list[str]:
    return list(REGISTRY)


def get_class(name: str):
    if name not in REGISTRY:
        raise UnknownMethod(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str, **options) -> Method:
    return get_class(name)(**options)


__all__ = ["TaskContext", "Method", "MethodNotApplicable", "ModelInfo", "StreamInfo", "get", "get_class", "names", "REGISTRY",
           "ALIASES"]
