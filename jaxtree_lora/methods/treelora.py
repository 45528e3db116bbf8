"""`treelora`, the user-facing name of TreeLoRA: the options of its two forms, never a method itself.

TreeLoRA runs as `treelora_llm` (one LoRA through every task, the official LLM code) or as
`treelora_hide` (inside HiDe-LoRA's decomposition, the paper's classification form). A run named
`treelora` trains the form its stream's kind picks, or the one `form` names; `jaxtree_lora.assemble`
makes that choice, in one place, and hands the options set under `config.method.treelora` to it.
`TreeLoRA` below only declares those options (each form's own, plus `form`) so that they can be set.
"""
from __future__ import annotations

import dataclasses

from jaxtree_lora.methods.treelora_hide import TreeLoRAHiDe
from jaxtree_lora.methods.treelora_llm import TreeLoRALLM

# form option -> the registered method it names ("auto": the stream's kind decides, see assemble.py).
FORMS = {"llm": "treelora_llm", "hide": "treelora_hide"}
FORM_CLASSES = {"treelora_llm": TreeLoRALLM, "treelora_hide": TreeLoRAHiDe}
# Fields of a form that the run sets, never the user.
RUN_FIELDS = ("lora", "max_tasks", "folded")


def _options() -> list:
    """(name, type, field) of every user option of either form, the first form's default where both have it."""
    seen = {}
    for cls in FORM_CLASSES.values():
        for field in dataclasses.fields(cls):
            if field.name not in RUN_FIELDS and field.name not in seen:
                seen[field.name] = (field.name, field.type, dataclasses.field(default=field.default))
    return list(seen.values())


TreeLoRA = dataclasses.make_dataclass(
    "TreeLoRA", _options() + [("form", str, dataclasses.field(default="auto"))], frozen=True,
    namespace={"name": "treelora", "forms": FORMS, "__doc__": "The options `config.method.treelora` may set."})
