"""SD-LoRA: scalable decoupled LoRA (Wu et al., ICLR 2025).

Follows the authors' code (`backbone/lora.py`, `models/sdlora.py`): each task trains a new LoRA;
earlier LoRAs become frozen, normalised DIRECTIONS with one learnable MAGNITUDE per task (shared by
every layer and site, initialised at 0.8). Inference sums every direction times its magnitude,
task-identity free. Options for the code-versus-paper differences: `normalise` ("product" of the
factors' norms, the code, or "paper") and `persist_alpha` (False reproduces the code's reset of
the magnitudes at each task). Magnitudes live in the trainable adapters as
`{"magnitudes": [max_tasks]}` and `forward_adapters` broadcasts them into every site's pytree.
Formula and defaults: docs/METHODS.md, section SD-LoRA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.inclora import IncLoRA

MAGNITUDES = "magnitudes"


@dataclasses.dataclass(frozen=True)
class SDLoRA(IncLoRA):
    """IncLoRA whose earlier adapters become normalised directions with learnable magnitudes."""

    name = "sd_lora"
    fold_past = None  # the past slots' magnitudes keep training: their sum is not a constant
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(rank=10, dropout=0.0)
    alpha_init: float = 0.8
    scale: float = 1.0
    normalise: str = "product"
    persist_alpha: bool = True

    def __post_init__(self):
        if self.normalise not in ("product", "paper"):
            raise ConfigError(f"sd_lora normalise must be 'product' (code) or 'paper', got {self.normalise!r}")

    def default_optimizer(self, batch_size: int) -> dict:
        """What the code runs (`models/sdlora.py`, CIFAR-100 config): SGD 8e-3, momentum 0.9, no weight
        decay (commented out upstream), no clipping; its MultiStepLR milestones lie beyond 20 epochs, so
        the rate is constant there as here."""
        return {"name": "sgd", "learning_rate": 8e-3, "momentum": 0.9, "weight_decay": 0.0, "clip_norm": 0.0}

    def init(self, key, model, stream):
        adapters, state = super().init(key, model, stream)
        adapters = {**adapters, MAGNITUDES: jnp.full((stream.max_tasks,), self.alpha_init, jnp.float32)}
        return adapters, state

    def begin_task(self, adapters, state, task):
        adapters, state = super().begin_task(adapters, state, task)
        if not self.persist_alpha:
            adapters = {**adapters, MAGNITUDES: jnp.full_like(adapters[MAGNITUDES], self.alpha_init)}
        return adapters, state

    def forward_adapters(self, adapters, state):
        sites = {site: leaves for site, leaves in adapters.items() if site != MAGNITUDES}
        magnitudes = adapters[MAGNITUDES]
        out = {}
        for site, leaves in sites.items():
            layers = leaves["a"].shape[0]
            out[site] = {**leaves, MAGNITUDES: jnp.broadcast_to(magnitudes, (layers,) + magnitudes.shape)}
        return out

    def delta(self, state, site, adapter, x, key):
        """x [..., d_in]; adapter a [K, r, d_in], b [K, d_out, r], magnitudes [K] (this layer's slice)."""
        x = lora_lib.dropout(x, self.lora.dropout, key)
        slots = state["slots"].shape[0]
        current = jnp.arange(slots) == state["task"]
        past = (jnp.arange(slots) < state["task"]).astype(jnp.float32)
        a = jnp.where(current[:, None, None], adapter["a"], jax.lax.stop_gradient(adapter["a"])).astype(jnp.float32)
        b = jnp.where(current[:, None, None], adapter["b"], jax.lax.stop_gradient(adapter["b"])).astype(jnp.float32)
        # Norms only scale the past (frozen) slots: computed on constants, which also keeps the gradient
        # of the current slot finite while its B is still 0 (d||B||/dB is undefined there).
        a_const, b_const = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
        if self.normalise == "product":
            norms = (jnp.linalg.norm(a_const.reshape(slots, -1), axis=-1)
                     * jnp.linalg.norm(b_const.reshape(slots, -1), axis=-1))
        else:
            norms = jnp.linalg.norm(jnp.einsum("kor,kri->koi", b_const, a_const).reshape(slots, -1), axis=-1)
        # Past slots: magnitude / norm; current slot: magnitude alone; later slots: 0.
        coefficient = adapter[MAGNITUDES] * (past / jnp.maximum(norms, 1e-12) + current.astype(jnp.float32))
        h = jnp.einsum("...i,kri->...kr", x, a.astype(x.dtype))
        h = h * coefficient.astype(x.dtype)[:, None]
        return self.scale * jnp.einsum("...kr,kor->...o", h, b.astype(x.dtype))

    def update_mask(self, state, trainable):
        slots = state["slots"].shape[0]
        current = (jnp.arange(slots) == state["task"]).astype(jnp.float32)
        learned = (jnp.arange(slots) <= state["task"]).astype(jnp.float32)
        mask = jax.tree.map(lambda leaf: jnp.ones((), jnp.float32), trainable)
        mask["adapters"] = {site: jax.tree.map(lambda leaf: current[None, :, None, None], leaves)
                            for site, leaves in trainable["adapters"].items() if site != MAGNITUDES}
        mask["adapters"][MAGNITUDES] = learned
        return mask

    def trainable_count(self, trainable, state):
        sites = {s: v for s, v in trainable["adapters"].items() if s != MAGNITUDES}
        slots = state["slots"].shape[0]
        task = int(state["task"])
        return lora_lib.count(sites) // slots + task + 1 + lora_lib.count(trainable.get("head", {}))
