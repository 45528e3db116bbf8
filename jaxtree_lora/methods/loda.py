"""LoDA: task-driven subspace decomposition for LoRA-based continual learning (He et al., ICML 2026).

Follows the official code HHHLF/LoDA_ICML2026 (`models/decomposed_lora.py`, `methods/dlora.py`). Per
adapted projection, each task's down-projections come from input statistics: a general one from the
top eigenvectors of current plus past second moments, an isolated one from the generalised
eigenproblem of current against past; only the up-projections train. At the task end the general
branch is recalibrated by an energy ratio and both are merged into the task's slot
(`merged_a [L, K, 2r, d_in]`, `merged_b [L, K, d_out, 2r]`); inference is the merged model,
task-identity free. Gradient-aligned optimisation (`gao`) splits each batch's classes in two; here
both look-ahead directions are averaged into one optimiser step. Classification only.
Formulas, defaults and departures: docs/METHODS.md, section LoDA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import Method
from jaxtree_lora import keys

LORA_KEYS = ("a_g", "b_g", "a_i", "b_i")


def top_eigenvectors(matrix: np.ndarray, count: int) -> np.ndarray:
    """[d, count]: eigenvectors of a symmetric matrix for its largest eigenvalues (descending)."""
    values, vectors = np.linalg.eigh(np.asarray(matrix, np.float64))
    return vectors[:, np.argsort(values)[::-1][:count]]


def generalised_top(current: np.ndarray, previous: np.ndarray, count: int) -> np.ndarray:
    """[d, count] orthonormal: directions with the largest u^T S_cur u / u^T S_prev u (official solver)."""
    current, previous = np.asarray(current, np.float64), np.asarray(previous, np.float64)
    d = previous.shape[0]
    jitter = 0.0
    for attempt in range(101):
        try:
            lower = np.linalg.cholesky(previous + jitter * np.eye(d))
            break
        except np.linalg.LinAlgError:
            jitter = 1e-12 if attempt == 0 else jitter * 10.0
    else:
        raise np.linalg.LinAlgError("LoDA: the past statistics stay singular after 100 jitter steps")
    inverse = np.linalg.inv(lower)
    values, vectors = np.linalg.eigh(inverse @ current @ inverse.T)
    top = vectors[:, np.argsort(values)[::-1][:count]]
    directions = inverse.T @ top
    q, _ = np.linalg.qr(directions)
    return q


def recalibration(a_general: np.ndarray, previous: np.ndarray, current: np.ndarray, kappa: float) -> np.ndarray:
    """eta [r] for the rows a_i of A_G: e_prev / (e_prev + kappa e_cur + 1e-12), energies clamped >= 0."""
    a = np.asarray(a_general, np.float64)
    e_prev = np.clip(np.einsum("ri,ij,rj->r", a, previous, a), 0.0, None)
    e_cur = np.clip(np.einsum("ri,ij,rj->r", a, current, a), 0.0, None)
    return e_prev / (e_prev + kappa * e_cur + 1e-12)


def lookahead_step(grads, mask, rho):
    """GAO's look-ahead displacement rho g / ||g|| for an adapter pytree, normalised per layer.

    grads: {site: {name: [L, ...]}} with the layer axis first (stacked sites); mask: the same tree,
    leaves broadcastable, > 0 where the optimiser may change an entry (`update_mask`); rho: scalar.
    The official code takes the norm per parameter tensor, and its tensors are per layer, so the
    norm here is over each layer's slice; frozen entries (A_I, A_G after task 0) do not move and
    do not count in the norm. A layer with no gradient stays put.
    """

    def one(g, m):
        g = jnp.where(m > 0, g, jnp.zeros_like(g))
        norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
        return rho * g / (norm + 1e-12)

    return jax.tree.map(one, grads, mask)


def batch_tokens(batch) -> jax.Array:
    """Tokens (text) or examples (images) of the whole batch, as the task loss counts them."""
    return jnp.sum(batch.get("attention_mask", batch["weight"]))


@dataclasses.dataclass(frozen=True)
class LoDA(Method):
    """Dual-branch LoRA on subspaces from input statistics, recalibrated and merged after each task."""

    name = "loda"
    default_head = "cosine"  # per-task CosFace heads (s 20), logits concatenated at inference
    stream_kinds = ("classification",)
    not_applicable_reason = ("LoDA is a class-incremental classifier: its gradient-aligned optimisation "
                             "splits each batch by class")
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.0)
    gamma_general: float = 0.25
    gamma_isolated: float = 0.5
    kappa: float = 3.0
    gao: bool = True
    rho: float = 0.3
    double_count: bool = True

    def __post_init__(self):
        if self.rho < 0 or self.kappa < 0:
            raise ConfigError(f"loda rho and kappa must be >= 0, got rho={self.rho}, kappa={self.kappa}")

    @property
    def delta_scale(self):
        """None: the general and isolated branches carry their own weights (gamma_general, gamma_isolated)."""
        return None

    def default_optimizer(self, batch_size: int) -> dict:
        """The CIFAR-100 config's (`exps/dlora/cifar10.json`): SGD 0.005, momentum 0.9, weight decay 5e-4,
        no clipping (its cosine over 20 epochs is not kept: the run's schedule applies)."""
        return {"name": "sgd", "learning_rate": 0.005, "momentum": 0.9, "weight_decay": 5e-4, "clip_norm": 0.0}

    def init(self, key, model, stream):
        sites = self.lora.select(model.sites)
        r, slots, layers = self.lora.rank, stream.max_tasks, model.num_layers
        adapters = {site: {"a_g": jnp.zeros((layers, r, s.d_in), jnp.float32),
                           "b_g": jnp.zeros((layers, s.d_out, r), jnp.float32),
                           "a_i": jnp.zeros((layers, r, s.d_in), jnp.float32),
                           "b_i": jnp.zeros((layers, s.d_out, r), jnp.float32)} for site, s in sites.items()}
        state = {"task": jnp.zeros((), jnp.int32),
                 "m_prev": {site: jnp.zeros((layers, s.d_in, s.d_in), jnp.float32) for site, s in sites.items()},
                 "merged_a": {site: jnp.zeros((layers, slots, 2 * r, s.d_in), jnp.float32) for site, s in sites.items()},
                 "merged_b": {site: jnp.zeros((layers, slots, s.d_out, 2 * r), jnp.float32) for site, s in sites.items()}}
        return adapters, state

    def forward_adapters(self, adapters, state):
        return {site: {**leaves, "merged_a": state["merged_a"][site], "merged_b": state["merged_b"][site]}
                for site, leaves in adapters.items()}

    def delta(self, state, site, adapter, x, key):
        x = lora_lib.dropout(x, self.lora.dropout, key)
        merged = jnp.einsum("...i,kri->...kr", x, adapter["merged_a"].astype(x.dtype))
        merged = jnp.einsum("...kr,kor->...o", merged, adapter["merged_b"].astype(x.dtype))
        general = jnp.einsum("...i,ri->...r", x, adapter["a_g"].astype(x.dtype)) @ adapter["b_g"].T.astype(x.dtype)
        isolated = jnp.einsum("...i,ri->...r", x, adapter["a_i"].astype(x.dtype)) @ adapter["b_i"].T.astype(x.dtype)
        return jax.lax.stop_gradient(merged) + self.gamma_general * general + self.gamma_isolated * isolated

    # -- GAO -----------------------------------------------------------------------------------
    def _halves(self, labels, weight, key):
        """Example weights of the two class halves and whether the batch has >= 2 classes."""
        # A random score per class (drawn at the class's first example); a class is in the first
        # half when its score ranks among the lowest floor(n/2) of the n classes present.
        present = (weight > 0)
        ids = jnp.where(present, labels, -1)
        same = (ids[:, None] == ids[None, :]) & present[:, None] & present[None, :]
        first = jnp.argmax(same, axis=1)  # index of the first example of each example's class
        is_first = (first == jnp.arange(labels.shape[0])) & present
        count = jnp.sum(is_first)
        class_score = jax.random.uniform(key, (labels.shape[0],))  # one score per "first example"
        score = class_score[first]
        rank = jnp.sum((class_score[None, :] < score[:, None]) & is_first[None, :], axis=1)
        in_first = (rank < jnp.maximum(count // 2, 1)) & present
        w = weight.astype(jnp.float32)
        return w * in_first, w * (present & ~in_first), count >= 2

    def loss(self, trainable, state, batch, key, task_loss):
        if not self.gao:
            return task_loss(trainable, key)
        if key is None:
            key = jax.random.PRNGKey(0)
        split_key, rho_key = jax.random.split(keys.derive(key, "loda_lookahead"))
        first, second, usable = self._halves(batch["labels"], batch["weight"], split_key)
        rho = -self.rho * jax.random.uniform(rho_key)
        mask = self.update_mask(state, trainable)["adapters"]

        def lookahead(trainable, weights_src):
            src = {**batch, "weight": weights_src}
            grads = jax.grad(lambda tr: task_loss(tr, key, src)[0])(trainable)
            step = lookahead_step(jax.lax.stop_gradient(grads["adapters"]), mask, rho)
            # theta' enters as theta + constant, so d L(theta') / d theta is the look-ahead gradient.
            return {**trainable, "adapters": jax.tree.map(jnp.add, trainable["adapters"], step)}

        def gao(trainable):
            loss_12, aux_12 = task_loss(lookahead(trainable, first), key, {**batch, "weight": second})
            loss_21, aux_21 = task_loss(lookahead(trainable, second), key, {**batch, "weight": first})
            # Accuracy of the whole batch: each half's, measured at its look-ahead, by its share.
            size_first, size_second = jnp.sum(first), jnp.sum(second)
            accuracy = ((aux_12["accuracy"] * size_second + aux_21["accuracy"] * size_first)
                        / jnp.maximum(size_first + size_second, 1.0))
            return 0.5 * (loss_12 + loss_21), {"accuracy": accuracy, "tokens": batch_tokens(batch)}

        def plain(trainable):
            loss, aux = task_loss(trainable, key)
            return loss, {"accuracy": aux["accuracy"], "tokens": batch_tokens(batch)}

        # Only the branch in use runs: the plain loss is the fallback for one-class batches.
        return jax.lax.cond(usable, gao, plain, trainable)

    def update_mask(self, state, trainable):
        first_task = (state["task"] == 0).astype(jnp.float32)
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        mask["adapters"] = {site: {"a_g": first_task, "b_g": jnp.ones((), jnp.float32),
                                   "a_i": jnp.zeros((), jnp.float32), "b_i": jnp.ones((), jnp.float32)}
                            for site in trainable["adapters"]}
        return mask

    # -- host work between tasks -------------------------------------------------------------------
    def prepare_task(self, trainable, state, context):
        """A_G and A_I from the new task's statistics and M_prev; B_G = B_I = 0."""
        task, r = context.task, self.lora.rank
        zeroed = {site: {**leaves, "b_g": jnp.zeros_like(leaves["b_g"]), "b_i": jnp.zeros_like(leaves["b_i"])}
                  for site, leaves in trainable["adapters"].items()}
        moments, _ = context.site_moments({**trainable, "adapters": zeroed}, state)
        adapters = {}
        for site, leaves in zeroed.items():
            current, previous = np.asarray(moments[site], np.float64), np.asarray(state["m_prev"][site], np.float64)
            a_g, a_i = np.zeros(leaves["a_g"].shape, np.float32), np.zeros(leaves["a_i"].shape, np.float32)
            for layer in range(current.shape[0]):
                a_g[layer] = top_eigenvectors(current[layer] + previous[layer], r).T / np.sqrt(3.0)
                if task > 0:
                    a_i[layer] = generalised_top(current[layer], previous[layer], r).T / np.sqrt(3.0)
            adapters[site] = {**leaves, "a_g": jnp.asarray(a_g), "a_i": jnp.asarray(a_i)}
        return {**trainable, "adapters": adapters}, state

    def end_task(self, trainable, state, context):
        """Recalibrate, merge into the task's slot, reset B, add the statistics to M_prev."""
        task = context.task
        trained, _ = context.site_moments(trainable, state)
        merged_a, merged_b, m_prev, adapters = {}, {}, {}, {}
        for site, leaves in trainable["adapters"].items():
            a_g, b_g = np.asarray(leaves["a_g"], np.float64), np.asarray(leaves["b_g"], np.float64)
            a_i, b_i = np.asarray(leaves["a_i"], np.float64), np.asarray(leaves["b_i"], np.float64)
            previous = np.asarray(state["m_prev"][site], np.float64)
            current = np.asarray(trained[site], np.float64)
            slot_a, slot_b = np.array(state["merged_a"][site]), np.array(state["merged_b"][site])
            for layer in range(a_g.shape[0]):
                eta = recalibration(a_g[layer], previous[layer], current[layer], self.kappa) if task > 0 \
                    else np.zeros(a_g.shape[1])
                slot_a[layer, task] = np.concatenate([a_g[layer], a_i[layer]], axis=0)
                slot_b[layer, task] = np.concatenate([self.gamma_general * b_g[layer] * (1.0 - eta)[None, :],
                                                      self.gamma_isolated * b_i[layer]], axis=1)
            merged_a[site], merged_b[site] = jnp.asarray(slot_a, jnp.float32), jnp.asarray(slot_b, jnp.float32)
            m_prev[site] = previous + current
            adapters[site] = {**leaves, "b_g": jnp.zeros_like(leaves["b_g"]), "b_i": jnp.zeros_like(leaves["b_i"])}
        trainable = {**trainable, "adapters": adapters}
        state = {**state, "merged_a": merged_a, "merged_b": merged_b}
        if self.double_count:
            # The code adds the task's statistics again, measured with the merged weights.
            again, _ = context.site_moments(trainable, state)
            m_prev = {site: m_prev[site] + np.asarray(again[site], np.float64) for site in m_prev}
        state = {**state, "m_prev": {site: jnp.asarray(value, jnp.float32) for site, value in m_prev.items()}}
        return trainable, state

    def trainable_count(self, trainable, state):
        per_site = sum(int(leaves["b_g"].size + leaves["b_i"].size) for leaves in trainable["adapters"].values())
        if int(state["task"]) == 0:
            per_site += sum(int(leaves["a_g"].size) for leaves in trainable["adapters"].values())
        return per_site + lora_lib.count(trainable.get("head", {}))
