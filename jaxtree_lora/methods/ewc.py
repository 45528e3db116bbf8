"""EWC on the adapter: SeqLoRA plus elastic weight consolidation (Kirkpatrick et al., PNAS 2017).

    L = L_t(theta) + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

over the LoRA parameters of the one continually trained adapter. At each task end theta* is the
adapter reached and F the diagonal empirical Fisher on that task's training data; Fishers accumulate
as `gamma * F_old + F_new` (gamma < 1: online EWC). The Fisher and the anchor start at zero with the
adapter's shapes, so the penalty is 0 in the first task and the step never recompiles. Why not the
LiLoRA repository's variant: docs/METHODS.md, section EWC.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import Method


@dataclasses.dataclass(frozen=True)
class EWC(Method):
    """SeqLoRA + EWC penalty on the adapter. Defaults: lambda 1e4, gamma 1 (sum of Fishers)."""

    name = "ewc"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)
    lam: float = 1e4
    gamma: float = 1.0

    def init(self, key, model, stream):
        adapters, state = super().init(key, model, stream)
        zeros = lambda: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.float32), adapters)
        # Separate buffers: the train step donates its state, and one buffer cannot be donated twice.
        return adapters, {**state, "fisher": zeros(), "anchor": zeros()}

    def penalty(self, adapters, state) -> jax.Array:
        return sum(jnp.sum(f * jnp.square(p.astype(jnp.float32) - a))
                   for f, p, a in zip(jax.tree.leaves(state["fisher"]), jax.tree.leaves(adapters),
                                      jax.tree.leaves(state["anchor"])))

    def loss(self, trainable, state, batch, key, task_loss):
        loss, aux = task_loss(trainable, key)
        penalty = self.penalty(trainable["adapters"], state)
        return loss + 0.5 * self.lam * penalty, {**aux, "ewc_penalty": penalty}

    def end_task(self, trainable, state, context):
        if context.fisher is None:
            raise ValueError("EWC needs the trainer's Fisher estimate (TaskContext.fisher)")
        fisher_new = context.fisher(trainable, state)["adapters"]
        fisher = jax.tree.map(lambda old, new: self.gamma * old + new, state["fisher"], fisher_new)
        anchor = jax.tree.map(lambda leaf: jnp.array(leaf, jnp.float32), trainable["adapters"])  # a copy
        return trainable, {**state, "fisher": fisher, "anchor": anchor}
