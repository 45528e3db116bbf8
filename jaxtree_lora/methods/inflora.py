"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024).

Follows the official code liangyanshuo/InfLoRA (`methods/inflora.py`, `models/vit_inflora.py`): one
new LoRA per task summed with the earlier ones (task-identity free). A_t is designed before the task
from the input second moments (`TaskContext.site_moments`) with old-task directions removed by a
per-site DualGPM memory, and stays fixed; only B_t (from 0) and the head train. After the task the
memory grows at an energy threshold rising from lamb to lame. No alpha/r scale by default. The
memory is a fixed-shape [L, d_in, d_in] basis per site (checkpointed; eigen/SVD work in float64 on
the host between tasks). Details and defaults: docs/METHODS.md, section InfLoRA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.inclora import IncLoRA, current_slot


def design_a(moment: np.ndarray, basis: np.ndarray, size: int, retain: bool, rank: int) -> np.ndarray:
    """A_t [rank, d] from M [d, d] and the memory (basis [d, d], first `size` columns valid)."""
    moment = np.asarray(moment, np.float64)
    if size > 0:
        u = np.asarray(basis, np.float64)[:, :size]
        projector = u @ u.T
        moment = projector @ moment if retain else moment - projector @ moment
    left, _, _ = np.linalg.svd(moment)
    return (left[:, :rank].T / np.sqrt(3.0)).astype(np.float32)


def update_memory(moment: np.ndarray, basis: np.ndarray, size: int, retain: bool, threshold: float):
    """One DualGPM step for one site and layer; returns (basis [d, d], size, retain).

    Energies are M's eigenvalues (R's squared singular values up to the token count)."""
    d = moment.shape[0]
    moment = np.asarray(moment, np.float64)
    eigenvalues, vectors = np.linalg.eigh(moment)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    total = float(eigenvalues.sum())
    if total <= 0.0:
        return basis, size, retain
    u = np.asarray(basis, np.float64)[:, :size]
    if size == 0 and not retain:
        # First task: keep the leading directions holding a `threshold` share of the energy.
        keep = int(np.sum(np.cumsum(eigenvalues) / total < threshold))
        new = vectors[:, :max(keep, 1)]
    elif not retain:
        # Energy of the inputs outside the remembered span; add directions until the share
        # already explained reaches the threshold.
        residual = moment - u @ (u.T @ moment) - (moment @ u) @ u.T + u @ (u.T @ moment @ u) @ u.T
        values, residual_vectors = np.linalg.eigh(residual)
        order = np.argsort(values)[::-1]
        values, residual_vectors = np.clip(values[order], 0.0, None), residual_vectors[:, order]
        explained = (total - float(values.sum())) / total
        count = 0
        for value in values:
            if explained >= threshold:
                break
            explained += value / total
            count += 1
        new = np.concatenate([u, residual_vectors[:, :count]], axis=1) if count else u
    else:
        # Retain memory: U spans the free space; remove the new task's important directions from it.
        projected = u @ (u.T @ moment @ u) @ u.T
        values, projected_vectors = np.linalg.eigh(projected)
        order = np.argsort(values)[::-1]
        values, projected_vectors = np.clip(values[order], 0.0, None), projected_vectors[:, order]
        explained = float(values.sum()) / total
        count = 0
        for value in values:
            if explained < 1.0 - threshold:
                break
            explained -= value / total
            count += 1
        if count == 0:
            return basis, size, retain
        taken = projected_vectors[:, :count]
        remaining = u - taken @ (taken.T @ u)
        left, singular, _ = np.linalg.svd(remaining, full_matrices=False)
        new = left[:, :max(size - count, 0)]
        out = np.zeros_like(np.asarray(basis, np.float32))
        out[:, :new.shape[1]] = new
        return out, new.shape[1], True
    if not retain and new.shape[1] > d / 2:
        # A wide remove basis is stored as its complement (the free space): cheaper to project with.
        left, singular, _ = np.linalg.svd(np.eye(d) - new @ new.T)
        complement = left[:, :d - new.shape[1]]
        out = np.zeros((d, d), np.float32)
        out[:, :complement.shape[1]] = complement
        return out, complement.shape[1], True
    out = np.zeros((d, d), np.float32)
    out[:, :new.shape[1]] = new
    return out, new.shape[1], False


@dataclasses.dataclass(frozen=True)
class InfLoRA(IncLoRA):
    """IncLoRA with designed, fixed down-projections orthogonal to old tasks' inputs (DualGPM)."""

    name = "inflora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(rank=10, dropout=0.0, targets=("k", "v"))
    lamb: float = 0.95
    lame: float = 1.0
    scale: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.lamb <= self.lame <= 1.0:
            raise ConfigError(f"inflora needs 0 < lamb <= lame <= 1, got lamb={self.lamb}, lame={self.lame}: "
                              f"set --config.method.inflora.lamb=0.95 --config.method.inflora.lame=1.0")

    def default_optimizer(self, batch_size: int) -> dict:
        """The code's: Adam 5e-4, betas (0.9, 0.999), no weight decay, no clipping (its cosine over 20
        epochs is not kept: the run's schedule applies)."""
        return {"name": "adam", "learning_rate": 5e-4, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0,
                "clip_norm": 0.0}

    def init(self, key, model, stream):
        adapters, state = super().init(key, model, stream)
        sites = self.lora.select(model.sites)
        state = {**state, "num_tasks": jnp.asarray(stream.num_tasks, jnp.int32),
                 "basis": {s: jnp.zeros((model.num_layers, site.d_in, site.d_in), jnp.float32)
                           for s, site in sites.items()},
                 "basis_size": {s: jnp.zeros((model.num_layers,), jnp.int32) for s in sites},
                 "retain": {s: jnp.zeros((model.num_layers,), bool) for s in sites}}
        return adapters, state

    def delta(self, state, site, adapter, x, key):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        if self.folded:
            slot = current_slot(adapter, state)
            return lora_lib.apply({**slot, "a": jax.lax.stop_gradient(slot["a"])}, x, self.scale)
        current = jnp.arange(state["slots"].shape[0]) == state["task"]
        a = jax.lax.stop_gradient(adapter["a"])  # designed, never trained
        b = jnp.where(current[:, None, None], adapter["b"], jax.lax.stop_gradient(adapter["b"]))
        b = b * state["slots"][:, None, None].astype(b.dtype)
        h = jnp.einsum("...i,kri->...kr", x, a.astype(x.dtype))
        return self.scale * jnp.einsum("...kr,kor->...o", h, b.astype(x.dtype))

    def update_mask(self, state, trainable):
        mask = super().update_mask(state, trainable)
        mask["adapters"] = {site: {**leaves, "a": jnp.zeros((), jnp.float32)} for site, leaves in mask["adapters"].items()}
        return mask

    def prepare_task(self, trainable, state, context):
        """Designs A_t for every site and layer from the new task's inputs and the memory."""
        task = context.task
        inactive = {**state, "slots": (jnp.arange(state["slots"].shape[0]) < task).astype(jnp.float32)}
        moments, _ = context.site_moments(trainable, inactive)  # B_t is not active yet: the model as it stands
        adapters = dict(trainable["adapters"])
        for site, moment in moments.items():
            moment = np.asarray(moment)
            basis, sizes, retain = (np.asarray(state["basis"][site]), np.asarray(state["basis_size"][site]),
                                    np.asarray(state["retain"][site]))
            a = np.array(adapters[site]["a"])
            for layer in range(moment.shape[0]):
                a[layer, task] = design_a(moment[layer], basis[layer], int(sizes[layer]), bool(retain[layer]),
                                          self.lora.rank)
            b = np.array(adapters[site]["b"])
            b[:, task] = 0.0
            adapters[site] = {**adapters[site], "a": jnp.asarray(a), "b": jnp.asarray(b)}
        return {**trainable, "adapters": adapters}, state

    def end_task(self, trainable, state, context):
        """The DualGPM memory absorbs the task's inputs (with the trained model)."""
        task = context.task
        moments, _ = context.site_moments(trainable, state)
        total = max(int(state["num_tasks"]), 1)
        threshold = (self.lame - self.lamb) * task / total + self.lamb
        basis, sizes, retain = dict(state["basis"]), dict(state["basis_size"]), dict(state["retain"])
        for site, moment in moments.items():
            moment = np.asarray(moment)
            b, n, r = np.array(basis[site]), np.array(sizes[site]), np.array(retain[site])
            for layer in range(moment.shape[0]):
                b[layer], n[layer], r[layer] = update_memory(moment[layer], b[layer], int(n[layer]), bool(r[layer]),
                                                             threshold)
            basis[site], sizes[site], retain[site] = jnp.asarray(b), jnp.asarray(n), jnp.asarray(r)
        return trainable, {**state, "basis": basis, "basis_size": sizes, "retain": retain}

    def trainable_count(self, trainable, state):
        per_slot_b = sum(int(np.prod(leaves["b"].shape)) // leaves["b"].shape[1]
                         for leaves in trainable["adapters"].values())
        return per_slot_b + lora_lib.count(trainable.get("head", {}))
