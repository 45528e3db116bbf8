"""Incremental LoRA (IncLoRA): a new adapter for each task, all of them summed.

At task t a fresh adapter (A ~ init, B = 0) is trained while the adapters of tasks 0..t-1 stay
frozen; the backbone sees the sum of every adapter learned so far, so inference needs no task
identity. This is the "new LoRA per task" baseline of the TreeLoRA paper's SeqLoRA description and
of O-LoRA/InfLoRA without their constraints.

Shapes are fixed for the stream: adapters are stacked over `max_tasks` slots,
`{"a": [L, max_tasks, r, d_in], "b": [L, max_tasks, d_out, r]}`, and slots after the current task
are masked out of the delta, so a new task never compiles the train step again. Only the current
slot receives gradients and optimiser updates (`update_mask`), so Adam's momentum cannot move a
frozen adapter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import Method, ModelInfo, StreamInfo


@dataclasses.dataclass(frozen=True)
class IncLoRA(Method):
    """A new LoRA per task; the sum of all learned adapters is applied (task-identity free)."""

    name = "inclora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)

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
        current = jnp.arange(state["slots"].shape[0]) == state["task"]
        # Past slots are constants: only the current task's adapter gets a gradient.
        keep = current[:, None, None]
        a = jnp.where(keep, adapter["a"], jax.lax.stop_gradient(adapter["a"]))
        b = jnp.where(keep, adapter["b"], jax.lax.stop_gradient(adapter["b"]))
        b = b * state["slots"][:, None, None].astype(b.dtype)
        # Sum over slots: concatenating the rank axes gives one [K*r] low-rank product.
        h = jnp.einsum("...i,kri->...kr", x, a.astype(x.dtype))
        return self.lora.scale * jnp.einsum("...kr,kor->...o", h, b.astype(x.dtype))

    def update_mask(self, state, trainable):
        current = (jnp.arange(state["slots"].shape[0]) == state["task"]).astype(jnp.float32)
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        mask["adapters"] = jax.tree.map(lambda leaf: current[None, :, None, None], trainable["adapters"])
        return mask

    def trainable_count(self, trainable, state):
        per_slot = lora_lib.count(trainable["adapters"]) // state["slots"].shape[0]
        return per_slot + lora_lib.count(trainable.get("head", {}))
