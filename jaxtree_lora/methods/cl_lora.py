"""CL-LoRA: continual low-rank adaptation for rehearsal-free class-incremental learning
(He, Duan, Zhu; CVPR 2025), following the official code JiangpengHe/CL-LoRA
(`backbone/vit_cllora.py`, `models/cllora.py`).

A task-shared LoRA on the first half of the blocks (A orthonormal and frozen, B trained in every
task) and per-task LoRAs on the second half (slots scaled by learnable block weights, frozen after
their task). From the second task on the loss adds distillation from the previous shared adapter
(its B gradient reweighted by the teacher's row norms) and an orthogonality penalty on the block
weights. Inference, task-identity free (per-slot scoring): each task's classes are scored with its
own adapters and the final shared one. Classification only. Losses, defaults and the two departures
forced by the one-step contract: docs/METHODS.md, section CL-LoRA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import InferenceRule, Method


def random_orthonormal(key, shape):
    """[..., r, d_in] with orthonormal rows: Q^T of the QR of a U[0, 1) [d_in, r] matrix (the code's)."""
    *leading, r, d_in = shape
    q, _ = jnp.linalg.qr(jax.random.uniform(key, (*leading, d_in, r), jnp.float32))
    return jnp.swapaxes(q, -1, -2)


def reassign(b, weights):
    """Identity on the value; the gradient reaching b is multiplied by `weights` (broadcast over b)."""
    return jax.lax.stop_gradient(b) + weights * (b - jax.lax.stop_gradient(b))


@dataclasses.dataclass(frozen=True)
class CLLoRA(Method):
    """Shared LoRA (first half, fixed A) + per-task LoRA with block weights (second half), KD, prototypes."""

    name = "cl_lora"
    default_head = "cosine"  # per-task proxy (cosine) heads for training
    default_classifier = "prototype"  # inference: cosine to each task's class prototypes, own-task features
    inference_rule = InferenceRule.PER_SLOT_SCORING
    stream_kinds = ("classification",)
    not_applicable_reason = "CL-LoRA is a class-incremental method with a prototype classifier"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.0)
    scale: float = 1.0
    kd_weight: float = 5.0
    temperature: float = 2.0
    orth_weight: float = 1e-4
    gradient_reassignment: bool = True
    block_weights: bool = True

    def __post_init__(self):
        if self.temperature <= 0 or self.kd_weight < 0 or self.orth_weight < 0:
            raise ConfigError("cl_lora needs temperature > 0, kd_weight >= 0 and orth_weight >= 0")

    def default_optimizer(self, batch_size: int) -> dict:
        """The CIFAR-100 config's (`exps/cifar.json`): SGD 0.03, momentum 0.9, weight decay 1e-4, no
        clipping (its cosine to 0 over 30 epochs is not kept: the run's schedule applies)."""
        return {"name": "sgd", "learning_rate": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "clip_norm": 0.0}

    def init(self, key, model, stream):
        sites = self.lora.select(model.sites)
        r, slots, layers = self.lora.rank, stream.max_tasks, model.num_layers
        adapters = {}
        for index, (site, s) in enumerate(sites.items()):
            k_shared, k_specific, k_weight = jax.random.split(jax.random.fold_in(key, index), 3)
            adapters[site] = {
                "a_s": random_orthonormal(k_shared, (layers, r, s.d_in)),
                "b_s": jnp.zeros((layers, s.d_out, r), jnp.float32),
                "a_t": random_orthonormal(k_specific, (layers, slots, r, s.d_in)),
                "b_t": jnp.zeros((layers, slots, s.d_out, r), jnp.float32),
                "w": jax.random.uniform(k_weight, (layers, slots), jnp.float32, 0.5, 1.5),
            }
        shared = (jnp.arange(layers) < layers // 2).astype(jnp.float32)
        state = {"task": jnp.zeros((), jnp.int32), "shared_layers": shared,
                 "teacher": {site: jnp.zeros((layers, s.d_out, r), jnp.float32) for site, s in sites.items()}}
        return adapters, state

    def forward_adapters(self, adapters, state):
        return {site: {**leaves, "shared": state["shared_layers"]} for site, leaves in adapters.items()}

    def delta(self, state, site, adapter, x, key):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        task = state["task"]
        shared = jnp.einsum("...i,ri->...r", x, jax.lax.stop_gradient(adapter["a_s"]).astype(x.dtype))
        shared = jnp.einsum("...r,or->...o", shared, adapter["b_s"].astype(x.dtype))
        a_t = jnp.take(adapter["a_t"], task, axis=0)
        b_t = jnp.take(adapter["b_t"], task, axis=0)
        weight = jnp.take(adapter["w"], task, axis=0) if self.block_weights else 1.0
        specific = jnp.einsum("...i,ri->...r", x, a_t.astype(x.dtype))
        specific = jnp.einsum("...r,or->...o", specific, b_t.astype(x.dtype))
        gate = adapter["shared"]
        return self.scale * (gate * shared + (1.0 - gate) * weight * specific)

    def importance(self, teacher):
        """Row weights of the shared B's KD gradient: teacher row norms normalised to mean 1. [L, d_out, 1]"""
        norms = jnp.linalg.norm(teacher, axis=-1, keepdims=True)
        return norms * norms.shape[-2] / jnp.maximum(jnp.sum(norms, axis=-2, keepdims=True), 1e-12)

    def orthogonality(self, adapters, task):
        """mean over k < task of |cos(vec w_task, vec w_k)|, the block weights of every site stacked."""
        w = jnp.concatenate([leaves["w"] for leaves in adapters.values()], axis=0)  # [sites * L, K]
        w = w / (jnp.linalg.norm(w, axis=0, keepdims=True) + 1e-12)
        cosines = jnp.abs(w.T @ jnp.take(w, task, axis=1))  # [K]
        past = (jnp.arange(w.shape[1]) < task).astype(jnp.float32)
        return jnp.sum(cosines * past) / jnp.maximum(task, 1).astype(jnp.float32)

    def loss(self, trainable, state, batch, key, task_loss):
        loss, aux = task_loss(trainable, key)
        task = state["task"]
        adapters = trainable["adapters"]
        # The KD path trains only B_s and the head: the specific half is a constant there.
        def kd_adapters(b_s_for):
            out = {}
            for site, leaves in adapters.items():
                const = jax.tree.map(jax.lax.stop_gradient, leaves)
                out[site] = {**const, "b_s": b_s_for(site, leaves)}
            return out

        if self.gradient_reassignment:
            student_b = lambda site, leaves: reassign(leaves["b_s"], self.importance(state["teacher"][site]))
        else:
            student_b = lambda site, leaves: leaves["b_s"]
        _, student = task_loss({**trainable, "adapters": kd_adapters(student_b)}, key)
        _, teacher = task_loss({**trainable, "adapters": kd_adapters(lambda site, leaves: state["teacher"][site])}, key)
        t = self.temperature
        teacher_p = jax.nn.softmax(teacher["class_logits"] / t, axis=-1)
        student_logp = jax.nn.log_softmax(student["class_logits"] / t, axis=-1)
        weight = batch["weight"].astype(jnp.float32)
        kd = -jnp.sum(jnp.sum(teacher_p * student_logp, axis=-1) * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        orth = self.orthogonality(adapters, task)
        later = (task > 0).astype(jnp.float32)
        total = loss + later * (self.kd_weight * kd + self.orth_weight * orth)
        return total, {**aux, "kd": later * kd, "orthogonality": later * orth}

    def update_mask(self, state, trainable):
        task = state["task"]
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        adapters = {}
        for site, leaves in trainable["adapters"].items():
            current = (jnp.arange(leaves["w"].shape[1]) == task).astype(jnp.float32)
            adapters[site] = {"a_s": jnp.zeros((), jnp.float32), "b_s": jnp.ones((), jnp.float32),
                              "a_t": current[None, :, None, None], "b_t": current[None, :, None, None],
                              "w": current[None, :] * (1.0 if self.block_weights else 0.0)}
        mask["adapters"] = adapters
        return mask

    def end_task(self, trainable, state, context):
        """The shared B becomes the next task's teacher."""
        teacher = {site: jnp.array(leaves["b_s"]) for site, leaves in trainable["adapters"].items()}
        return trainable, {**state, "teacher": teacher}

    def trainable_count(self, trainable, state):
        total = 0
        for leaves in trainable["adapters"].values():
            slots = leaves["w"].shape[1]
            total += int(leaves["b_s"].size) + sum(int(leaves[k].size) // slots for k in ("a_t", "b_t", "w"))
        return total + lora_lib.count(trainable.get("head", {}))
