"""C-LoRA: continual low-rank adaptation with a routing matrix (Zhang, Bai, Yang, Liang; arXiv 2502.17920).

No official code exists; this is reconstructed from the paper's equations (low confidence). One
LoRA per projection with a routing matrix between the factors, delta W = B R A, R = R_old + R_delta;
the old route counts in the forward pass and is stopped in the backward pass. Loss: CE + lam
||U_old^T R_delta||_F^2 (U_old an energy-thresholded basis of col(R_old)). End of task: R_old +=
R_delta, R_delta = 0; the first task starts at R_delta = I (plain LoRA) to avoid an all-zero
gradient. `factors` "trained" (default) or "frozen_after_first" (A, B fixed after task 0).
Inference: the one adapter, task-identity free. Shapes are fixed ([L, r, r] per site).
Choices and defaults: docs/METHODS.md, section C-LoRA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import Method


def orthonormal_basis(matrix: np.ndarray, energy: float) -> np.ndarray:
    """[r, r] whose leading columns span the directions of col(matrix) holding an `energy` share of its
    squared singular values; the other columns are zero (they add nothing to ||U^T R||)."""
    left, singular, _ = np.linalg.svd(np.asarray(matrix, np.float64))
    power = singular ** 2
    out = np.zeros_like(left)
    if power.sum() <= 0.0:
        return out.astype(np.float32)
    keep = int(np.searchsorted(np.cumsum(power) / power.sum(), energy - 1e-12) + 1)
    out[:, :keep] = left[:, :keep]
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CLoRA(Method):
    """One LoRA with routing R = R_old + R_delta; gradients only through R_delta's route."""

    name = "c_lora"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.0)
    lam: float = 0.01
    basis_energy: float = 0.99
    factors: str = "trained"  # or "frozen_after_first"

    def __post_init__(self):
        if self.factors not in ("trained", "frozen_after_first"):
            raise ConfigError(f"c_lora factors must be 'trained' or 'frozen_after_first', got {self.factors!r}")
        if self.lam < 0:
            raise ConfigError(f"c_lora lam must be >= 0, got {self.lam}: set --config.method.c_lora.lam=0.01")
        if not 0.0 < self.basis_energy <= 1.0:
            raise ConfigError(f"c_lora basis_energy must be in (0, 1], got {self.basis_energy}")

    def init(self, key, model, stream):
        adapters = lora_lib.init(key, self.lora, model.sites, model.num_layers)
        r = self.lora.rank
        eye = lambda: jnp.tile(jnp.eye(r, dtype=jnp.float32), (model.num_layers, 1, 1))  # a buffer per site
        adapters = {site: {**leaves, "r_delta": eye()} for site, leaves in adapters.items()}
        zeros = lambda: {site: jnp.zeros((model.num_layers, r, r), jnp.float32) for site in adapters}
        # Separate buffers: the train step donates the state, and one buffer may not be donated twice.
        return adapters, {"task": jnp.zeros((), jnp.int32), "r_old": zeros(), "u_old": zeros()}

    def begin_task(self, adapters, state, task):
        return adapters, {**state, "task": jnp.asarray(task, jnp.int32)}

    def forward_adapters(self, adapters, state):
        # R_old rides with each site's per-layer slice (a constant: it is method state).
        return {site: {**leaves, "r_old": state["r_old"][site]} for site, leaves in adapters.items()}

    def delta(self, state, site, adapter, x, key):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        h = jnp.einsum("...i,ri->...r", x, adapter["a"].astype(x.dtype))
        old = jnp.einsum("...r,sr,os->...o", h, adapter["r_old"].astype(x.dtype), adapter["b"].astype(x.dtype))
        new = jnp.einsum("...r,sr,os->...o", h, adapter["r_delta"].astype(x.dtype), adapter["b"].astype(x.dtype))
        return self.lora.scale * (jax.lax.stop_gradient(old) + new)

    def update_mask(self, state, trainable):
        if self.factors == "trained":
            return None
        # From the second task on only R_delta (and the head) moves.
        open_ = (state["task"] == 0).astype(jnp.float32)
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        mask["adapters"] = {site: {**leaves, "a": open_, "b": open_} for site, leaves in mask["adapters"].items()}
        return mask

    def trainable_count(self, trainable, state):
        if self.factors == "trained" or int(state["task"]) == 0:
            return lora_lib.count(trainable)
        return lora_lib.count(trainable) - sum(int(leaves["a"].size + leaves["b"].size)
                                               for leaves in trainable["adapters"].values())

    def orthogonality(self, adapters, state) -> jax.Array:
        """sum over sites and layers of ||U_old^T R_delta||_F^2."""
        total = jnp.zeros((), jnp.float32)
        for site, leaves in adapters.items():
            product = jnp.einsum("lrs,lrt->lst", state["u_old"][site], leaves["r_delta"].astype(jnp.float32))
            total = total + jnp.sum(jnp.square(product))
        return total

    def loss(self, trainable, state, batch, key, task_loss):
        loss, aux = task_loss(trainable, key)
        orthogonal = self.orthogonality(trainable["adapters"], state)
        return loss + self.lam * orthogonal, {**aux, "orthogonality": orthogonal}

    def end_task(self, trainable, state, context):
        """R_old += R_delta, U_old from its SVD, R_delta = 0 (host work between tasks)."""
        r_old, u_old, adapters = {}, {}, {}
        for site, leaves in trainable["adapters"].items():
            merged = np.asarray(state["r_old"][site]) + np.asarray(leaves["r_delta"])
            r_old[site] = jnp.asarray(merged, jnp.float32)
            u_old[site] = jnp.asarray(np.stack([orthonormal_basis(layer, self.basis_energy) for layer in merged]))
            adapters[site] = {**leaves, "r_delta": jnp.zeros_like(leaves["r_delta"])}
        return {**trainable, "adapters": adapters}, {**state, "r_old": r_old, "u_old": u_old}
