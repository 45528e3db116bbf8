"""The weights a method's forward runs on: the frozen ones, with the frozen past slots folded in.

Where `backbone.folds_slots` allows it (`Method.fold_past`, float32 kernels), the sum of the past
slots is merged into the kernels and the method runs `folded`, its current slot alone: one rank-r
product per site instead of one per slot. Evaluation and the statistics passes (no dropout) always
use the folded weights; training only where LoRA dropout is 0, since with dropout the past slots see
the dropped input, which a kernel cannot. The weights are recomputed from the untouched ones
whenever the adapters or the method state change, so a resumed run gets the same bits.
"""
from __future__ import annotations

import dataclasses

import jax

from jaxtree_lora.train import mesh as mesh_lib
from jaxtree_lora.train.backbone import folds_slots, merge_into_kernels


class Folding:
    """The run's folding plan: `fold` (whether it folds at all), `forward_method` (the method on
    folded weights), `train_method` (what the train step runs), `weights(...)`."""

    def __init__(self, config, method, backbone, mesh, frozen):
        self.fold = folds_slots(config, method, backbone.params, getattr(backbone, "site_kernel", None),
                                lambda: method.lora.select(backbone.info.sites),
                                getattr(backbone, "compute_dtype", None))
        self.forward_method = dataclasses.replace(method, folded=True) if self.fold else method
        self.in_training = self.fold and float(method.lora.dropout) == 0.0
        self.train_method = self.forward_method if self.in_training else method
        self.mesh, self.frozen, self._cache = mesh, frozen, None
        if self.fold:
            forward_method, site_kernel = self.forward_method, backbone.site_kernel
            self.merge = jax.jit(
                lambda frozen, adapters, method_state: merge_into_kernels(
                    frozen, site_kernel, forward_method.fold_past(adapters, method_state)),
                out_shardings=jax.tree.map(lambda leaf: leaf.sharding, frozen))

    def weights(self, trainable, method_state):
        """The weights `forward_method` runs on for this state: the frozen ones, with the slots before
        method_state["task"] added to the kernels where the run folds. The last result is kept for the
        same arrays."""
        if not self.fold:
            return self.frozen
        leaves = jax.tree.leaves((trainable["adapters"], method_state))
        cached = self._cache
        if cached is not None and len(cached[0]) == len(leaves) and all(a is b for a, b in zip(cached[0], leaves)):
            return cached[1]
        # One sharding for every call (a method's host work hands back single-device arrays), one compile.
        adapters, method_state = mesh_lib.to_global((trainable["adapters"], method_state),
                                                    mesh_lib.replicated(self.mesh))
        weights = self.merge(self.frozen, adapters, method_state)
        self._cache = (leaves, weights)
        return weights

    def train_weights(self, trainable, method_state):
        """The train step's weights (folded only where training folds)."""
        return self.weights(trainable, method_state) if self.in_training else self.frozen
