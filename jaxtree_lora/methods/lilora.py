"""LiLoRA: LoRA in LoRA (Che et al., AAAI 2026, arXiv 2508.06202).

Follows the official code chanceche/LiLoRA (`PEFT_LiLoRA/peft/tuners/lilora.py`, `train_task.sh`).
At task t every adapted projection adds

    scale * [ sigmoid(f_t) B_sh + (1 - sigmoid(f_t)) B_t A_t ] A_sh dropout(x)

with A_sh, B_sh shared and each task's B_t, A_t, f_t in `max_tasks` slots. Inference uses the
task's own branch: the official evaluation is given the task identity, so LiLoRA's results use it.
`stability` (default 0, as the released code) enables a reconstruction of the paper's cosine
stability loss. Training rules and defaults: docs/METHODS.md, section LiLoRA.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import InferenceRule, Method
from jaxtree_lora.models.common import token_weight


@dataclasses.dataclass(frozen=True)
class LiLoRA(Method):
    """Shared A, a gated mix of the shared B and a per-task low-rank B inside A's space."""

    name = "lilora"
    inference_rule = InferenceRule.GIVEN_TASK_SLOT
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.05)
    sub_rank: int = 4
    stability: float = 0.0

    def __post_init__(self):
        if not 1 <= self.sub_rank <= self.lora.rank:
            raise ConfigError(f"lilora sub_rank must be in [1, lora.rank={self.lora.rank}], got {self.sub_rank}: "
                              f"set --config.method.lilora.sub_rank")
        if self.stability < 0:
            raise ConfigError(f"lilora stability must be >= 0, got {self.stability}")

    def init(self, key, model, stream):
        shared_key, a_key, f_key = jax.random.split(key, 3)
        shared = lora_lib.init(shared_key, self.lora, model.sites, model.num_layers)
        slots, r, s = stream.max_tasks, self.lora.rank, self.sub_rank
        adapters = {}
        for index, (site, leaves) in enumerate(shared.items()):
            layers, d_out = leaves["b"].shape[0], leaves["b"].shape[1]
            bound = 1.0 / math.sqrt(r)  # Kaiming-uniform(a=sqrt 5) on an [s, r] weight
            adapters[site] = {
                "a_sh": leaves["a"], "b_sh": leaves["b"],
                "a_sp": jax.random.uniform(jax.random.fold_in(a_key, index), (layers, slots, s, r), jnp.float32,
                                           -bound, bound),
                "b_sp": jnp.zeros((layers, slots, d_out, s), jnp.float32),
                "fusion": jax.random.normal(jax.random.fold_in(f_key, index), (layers, slots), jnp.float32),
            }
        previous = {site: jnp.array(leaves["a_sh"]) for site, leaves in adapters.items()}
        return adapters, {"task": jnp.zeros((), jnp.int32), "a_sh_prev": previous}

    def forward_adapters(self, adapters, state):
        return {site: {**leaves, "a_sh_prev": state["a_sh_prev"][site]} for site, leaves in adapters.items()}

    def _up(self, state, adapter):
        """The task's effective up-projection [d_out, r]."""
        task = state["task"]
        gate = jax.nn.sigmoid(jnp.take(adapter["fusion"], task, axis=0))
        b_sp = jnp.take(adapter["b_sp"], task, axis=0)
        a_sp = jnp.take(adapter["a_sp"], task, axis=0)
        return gate * adapter["b_sh"] + (1.0 - gate) * (b_sp @ a_sp)

    def delta(self, state, site, adapter, x, key):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        h = jnp.einsum("...i,ri->...r", x, adapter["a_sh"].astype(x.dtype))
        return self.lora.scale * jnp.einsum("...r,or->...o", h, self._up(state, adapter).astype(x.dtype))

    def record(self, state, site, adapter, x, weight):
        """[2]: sum over real tokens of 1 - cos(A_sh x, A_sh_prev x), and the token count."""
        if self.stability == 0.0:
            return jnp.zeros((2,), jnp.float32)
        x32 = x.astype(jnp.float32)
        now = jnp.einsum("...i,ri->...r", x32, adapter["a_sh"].astype(jnp.float32))
        before = jnp.einsum("...i,ri->...r", x32, adapter["a_sh_prev"].astype(jnp.float32))
        cosine = jnp.sum(now * before, -1) / (jnp.linalg.norm(now, axis=-1) * jnp.linalg.norm(before, axis=-1) + 1e-8)
        w = token_weight(weight, cosine.shape)
        return jnp.stack([jnp.sum((1.0 - cosine) * w), jnp.sum(w)])

    def loss(self, trainable, state, batch, key, task_loss):
        loss, aux = task_loss(trainable, key)
        if self.stability == 0.0:
            return loss, aux
        records = aux.pop("site_records")
        sums = sum(jnp.sum(r[:, 0]) for r in records.values())
        counts = sum(jnp.sum(r[:, 1]) for r in records.values())
        stability = sums / jnp.maximum(counts, 1.0)
        # From the second task on: the first task has no previous shared A to stay close to.
        stability = jnp.where(state["task"] > 0, stability, 0.0)
        return loss + self.stability * stability, {**aux, "stability": stability}

    def update_mask(self, state, trainable):
        task = state["task"]
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        adapters = {}
        for site, leaves in trainable["adapters"].items():
            current = (jnp.arange(leaves["fusion"].shape[1]) == task).astype(jnp.float32)
            adapters[site] = {"a_sh": jnp.ones((), jnp.float32),
                              "b_sh": (task == 0).astype(jnp.float32),
                              "a_sp": current[None, :, None, None], "b_sp": current[None, :, None, None],
                              "fusion": current[None, :]}
        mask["adapters"] = adapters
        return mask

    def end_task(self, trainable, state, context):
        previous = {site: jnp.array(leaves["a_sh"]) for site, leaves in trainable["adapters"].items()}
        return trainable, {**state, "a_sh_prev": previous}

    def trainable_count(self, trainable, state):
        total = 0
        for leaves in trainable["adapters"].values():
            slots = leaves["fusion"].shape[1]
            per_task = sum(int(leaves[k].size) // slots for k in ("a_sp", "b_sp", "fusion"))
            total += int(leaves["a_sh"].size) + per_task + (int(leaves["b_sh"].size) if int(state["task"]) == 0 else 0)
        return total + lora_lib.count(trainable.get("head", {}))
