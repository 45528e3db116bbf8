"""Incremental LoRA (IncLoRA): a new adapter for each task, all of them summed.

At task t a fresh adapter (A ~ init, B = 0) is trained while the adapters of tasks 0..t-1 stay
frozen; the backbone sees the sum, so inference needs no task identity. Adapters are stacked over
`max_tasks` slots, `{"a": [L, max_tasks, r, d_in], "b": [L, max_tasks, d_out, r]}`, later slots
masked out of the delta and only the current slot updated (`update_mask`), so a new task never
recompiles and Adam's momentum cannot move a frozen adapter. A run folds the frozen slots into the
kernels (`Method.fold_past`) and runs with `folded=True`: one rank-r product per site. More in
docs/METHODS.md, section IncLoRA.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import Method, ModelInfo, StreamInfo


def current_slot(adapter, state) -> dict:
    """The slot state["task"] of one layer's stacked adapter {"a": [K, r, d_in], "b": [K, d_out, r]}, its B
    times the slot's activity (0 before the task begins), as {"a": [r, d_in], "b": [d_out, r]}."""
    task = state["task"]
    a = jax.lax.dynamic_index_in_dim(adapter["a"], task, axis=0, keepdims=False)
    b = jax.lax.dynamic_index_in_dim(adapter["b"], task, axis=0, keepdims=False)
    return {"a": a, "b": b * state["slots"][task].astype(b.dtype)}


def fold_slots(adapters, weights, scale: float) -> dict:
    """The weighted sum of stacked slots {"a": [L, K, r, d_in], "b": [L, K, d_out, r]} as one adapter of
    rank K r, {"a": [L, K r, d_in], "b": [L, d_out, K r]}, with `scale * weights[k]` folded into slot k's B
    (so `lora.merge(kernel, adapter, 1.0)` adds scale * sum_k weights[k] A_k^T B_k^T). Constants: no
    gradient flows into the fold."""
    weights = scale * jnp.asarray(weights, jnp.float32)
    folded = {}
    for site, leaves in jax.lax.stop_gradient(adapters).items():
        a, b = leaves["a"].astype(jnp.float32), leaves["b"].astype(jnp.float32)
        layers, slots, rank, d_in = a.shape
        b = jnp.moveaxis(b * weights[None, :, None, None], 1, 2)  # [L, d_out, K, r]
        folded[site] = {"a": a.reshape(layers, slots * rank, d_in), "b": b.reshape(layers, b.shape[1], slots * rank)}
    return folded


@dataclasses.dataclass(frozen=True)
class IncLoRA(Method):
    """A new LoRA per task; the sum of all learned adapters is applied (task-identity free)."""

    name = "inclora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)
    # Set by the run when the slots before state["task"] are already in the frozen kernels (`fold_past`).
    folded: bool = False

    def init(self, key, model: ModelInfo, stream: StreamInfo):
        adapters = lora_lib.init(key, self.lora, model.sites, model.num_layers, leading=(stream.max_tasks,))
        return adapters, {"task": jnp.zeros((), jnp.int32),
                          "slots": jnp.zeros((stream.max_tasks,), jnp.float32)}

    def begin_task(self, adapters, state, task):
        task = jnp.asarray(task, jnp.int32)
        slots = (jnp.arange(state["slots"].shape[0]) <= task).astype(jnp.float32)
        return adapters, {**state, "task": task, "slots": slots}

    def delta(self, state, site: str, adapter, x, key: Optional[jax.Array]):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        if self.folded:
            return lora_lib.apply(current_slot(adapter, state), x, self.lora.scale)
        current = jnp.arange(state["slots"].shape[0]) == state["task"]
        # Past slots are constants: only the current task's adapter gets a gradient.
        keep = current[:, None, None]
        a = jnp.where(keep, adapter["a"], jax.lax.stop_gradient(adapter["a"]))
        b = jnp.where(keep, adapter["b"], jax.lax.stop_gradient(adapter["b"]))
        b = b * state["slots"][:, None, None].astype(b.dtype)
        # Sum over slots: concatenating the rank axes gives one [K*r] low-rank product.
        h = jnp.einsum("...i,kri->...kr", x, a.astype(x.dtype))
        return self.lora.scale * jnp.einsum("...kr,kor->...o", h, b.astype(x.dtype))

    def fold_past(self, adapters, state):
        """The slots before state["task"] as one adapter per site (`fold_slots`), for `lora.merge`."""
        return fold_slots(adapters, (jnp.arange(state["slots"].shape[0]) < state["task"]) * state["slots"],
                          self.delta_scale)

    def update_mask(self, state, trainable):
        current = (jnp.arange(state["slots"].shape[0]) == state["task"]).astype(jnp.float32)
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        mask["adapters"] = jax.tree.map(lambda leaf: current[None, :, None, None], trainable["adapters"])
        return mask

    def trainable_count(self, trainable, state):
        per_slot = lora_lib.count(trainable["adapters"]) // state["slots"].shape[0]
        return per_slot + lora_lib.count(trainable.get("head", {}))
