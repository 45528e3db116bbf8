"""Sequential LoRA (SeqLoRA): one adapter trained on through every task, nothing else.

This is what the official TreeLoRA code calls its LoRA baseline (`ZinYY/TreeLoRA:model/lora.py`):
the same rank-r adapter continues from task to task with no reset, no merge and no regulariser, and
inference uses the last adapter without a task identity. It is the lower bound every continual
method must beat on forgetting.

Defaults (the official TreeLoRA scripts; docs/METHODS.md): rank 8, alpha 32, dropout 0.1,
targets q_proj and v_proj, A ~ kaiming_uniform(a=sqrt 5), B = 0.
"""
from __future__ import annotations

import dataclasses

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import Method


@dataclasses.dataclass(frozen=True)
class SeqLoRA(Method):
    """One LoRA adapter, trained on through all tasks (task-identity free)."""

    name = "seqlora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)
