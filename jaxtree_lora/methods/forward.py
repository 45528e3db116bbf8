"""A method's forward through a backbone: what evaluation and the statistics passes both run.

`features` is the backbone's pooled features with the method's adapters as `method_state` sets them
(`Method.forward_adapters`, `Method.delta`). A caller that watches every adapted site on the way
passes its own hook wrapping `method_delta` (`models.common.SiteRecorder`: the input second moments
InfLoRA and LoDA need). `pretrained_features` is the backbone alone. Pure functions of pytrees,
for the caller to jit.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp


def method_delta(method, method_state) -> Callable:
    """The backbone's delta hook (site, adapter, x, key) -> dy: `method.delta` in `method_state`."""
    return lambda site, adapter, x, key: method.delta(method_state, site, adapter, x, key)


def features(backbone, method, trainable, frozen, method_state, batch, delta: Optional[Callable] = None):
    """[B, d] float32 features of `batch` on the weights `frozen` through `trainable["adapters"]`;
    `delta`: the hook the backbone calls at each site (`method_delta` when not given)."""
    delta = delta or method_delta(method, method_state)
    adapters = method.forward_adapters(trainable["adapters"], method_state)
    return backbone.features(frozen, batch, adapters=adapters, delta=delta).astype(jnp.float32)


def pretrained_features(backbone, frozen, batch):
    """[B, d] float32 features of `batch` through the backbone alone."""
    return backbone.features(frozen, batch).astype(jnp.float32)
