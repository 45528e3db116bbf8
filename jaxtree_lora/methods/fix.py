"""FIX: the pre-trained model, nothing trained (the FIX column of TreeLoRA's Tables 3, 7, 9 and 13).

The baseline every continual method has to beat. No adapter, no head, no optimiser step: the loop
skips training for a method whose `trains` is False and evaluates the backbone as loaded.

- Class-incremental streams: the rehearsal-free nearest class mean of the pre-trained features
  (each class's mean feature over its task's training data, computed when the task arrives; the
  features never change, so no prototype ever goes stale).
- Instruction streams: zero-shot answers, greedy-decoded from the stream's prompts.

Any method that does not beat this row by more than its spread over seeds has not learned anything
useful on that stream.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import InferenceRule, Method


@dataclasses.dataclass(frozen=True)
class Fix(Method):
    """The frozen pre-trained model (no adapters, nothing trained)."""

    name = "fix"
    default_classifier = "prototype"
    inference_rule = InferenceRule.PROTOTYPES
    trains = False
    # Unused (no adapter is built); kept so `config.lora` overrides stay valid for every method.
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec()

    def init(self, key, model, stream):
        return {}, {"task": jnp.zeros((), jnp.int32)}

    def trainable_count(self, trainable, state) -> int:
        return 0
