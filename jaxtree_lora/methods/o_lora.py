"""O-LoRA: orthogonal subspace learning (Wang et al., EMNLP Findings 2023), with a working penalty.

Follows the official code cmnfriend/O-LoRA: each task trains a new LoRA next to the frozen, summed
adapters of earlier tasks (task-identity free), and the loss adds `lambda_1` times the absolute
entries of A_old A_new^T summed over modules (`src/uie_trainer_lora.py`, `training_step`; the
paper's squared sum on the up-projection is `penalty="squared"`) plus `lambda_2` times the new
parameters' norm. Defaults from `scripts/order_*.sh`: lambda_1 0.5, lambda_2 0, r 8, alpha 32,
dropout 0.1. The TreeLoRA repository's copy has an empty old adapter, so its penalty is always 0;
here the old adapters are this run's learned slots (IncLoRA's layout). More: docs/METHODS.md.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.inclora import IncLoRA


@dataclasses.dataclass(frozen=True)
class OLoRA(IncLoRA):
    """IncLoRA plus the orthogonality penalty between the new and the earlier down-projections."""

    name = "o_lora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)
    lambda_1: float = 0.5
    lambda_2: float = 0.0
    penalty: str = "abs"  # "abs" (official code) or "squared" (paper)

    def __post_init__(self):
        if self.penalty not in ("abs", "squared"):
            raise ValueError(f"o_lora penalty must be 'abs' or 'squared', got {self.penalty!r}")

    def orthogonality(self, adapters, task) -> jax.Array:
        """sum over sites and layers of |A_past A_new^T| (entries of earlier slots only)."""
        total = jnp.zeros((), jnp.float32)
        for adapter in adapters.values():
            a = adapter["a"].astype(jnp.float32)  # [L, K, r, d_in]
            slots = a.shape[1]
            new = jnp.take(a, task, axis=1)  # [L, r, d_in]
            products = jnp.einsum("lkri,lsi->lkrs", a, new)
            past = (jnp.arange(slots) < task).astype(jnp.float32)[None, :, None, None]
            values = jnp.abs(products) if self.penalty == "abs" else jnp.square(products)
            total = total + jnp.sum(values * past)
        return total

    def l2(self, adapters, task) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for adapter in adapters.values():
            for leaf in adapter.values():
                total = total + jnp.sqrt(jnp.sum(jnp.square(jnp.take(leaf.astype(jnp.float32), task, axis=1))))
        return total

    def loss(self, trainable, state, batch, key, task_loss):
        loss, aux = task_loss(trainable, key)
        orthogonal = self.orthogonality(trainable["adapters"], state["task"])
        total = loss + self.lambda_1 * orthogonal
        if self.lambda_2:
            total = total + self.lambda_2 * self.l2(trainable["adapters"], state["task"])
        return total, {**aux, "orthogonality": orthogonal}
