"""`Stacked`: an NNX module holding one block's weights for every layer, stacked on axis 0.

Each attribute is an `nnx.Param` of shape [num_layers, ...]. `as_dict()` hands the arrays to
`common.scan_layers`, which slices them layer by layer, so a deep model compiles one block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Stacked(nnx.Module):
    def __init__(self, shapes: dict, key, param_dtype=jnp.float32, ones=(), std: float = 0.02):
        """shapes: name -> [num_layers, ...]. 1-D-per-layer entries (biases, norms) start at 0,
        except those named in `ones` (norm scales) which start at 1; matrices ~ N(0, std^2)."""
        self._names = tuple(shapes)
        for index, (name, shape) in enumerate(shapes.items()):
            if name in ones:
                value = jnp.ones(shape, param_dtype)
            elif len(shape) <= 2:
                value = jnp.zeros(shape, param_dtype)
            else:
                value = (std * jax.random.normal(jax.random.fold_in(key, index), shape)).astype(param_dtype)
            setattr(self, name, nnx.Param(value))

    def as_dict(self) -> dict:
        return {name: getattr(self, name)[...] for name in self._names}
