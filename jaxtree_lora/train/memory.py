"""A per-device memory plan for a model and config, built on `jax.eval_shape` (nothing is allocated).

    frozen weights      bytes of the backbone's parameters / their sharding over `fsdp`
    trainable + Adam    adapters and head, twice more for Adam's moments (replicated)
    method state        e.g. TreeLoRA's bank of task vectors [max_tasks, D, F] (replicated)
    activations         per micro-batch per device: decoder/encoder blocks after Korthikanti et al.
                        (2022): 34*s*b*h + 5*a*s^2*b bytes per layer in 16-bit, or only the block inputs
                        (2*s*b*h per layer) plus one block's worth when every block is rematerialised

The planner refuses, with the numbers, a plan that does not fit the device's memory.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np


class PlanDoesNotFit(ValueError):
    pass


@dataclasses.dataclass
class MemoryPlan:
    frozen_bytes: float
    trainable_bytes: float
    optimizer_bytes: float
    method_bytes: float
    activation_bytes: float
    devices: int
    capacity_bytes: Optional[float]

    @property
    def total(self) -> float:
        return (self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes + self.method_bytes
                + self.activation_bytes)

    def table(self) -> str:
        gib = 2 ** 30
        rows = [("frozen weights", self.frozen_bytes), ("adapters + head", self.trainable_bytes),
                ("optimiser state", self.optimizer_bytes), ("method state", self.method_bytes),
                ("activations", self.activation_bytes), ("total per device", self.total)]
        lines = [f"{name:<18} {value / gib:9.3f} GiB" for name, value in rows]
        if self.capacity_bytes:
            lines.append(f"{'device memory':<18} {self.capacity_bytes / gib:9.3f} GiB")
        return "\n".join(lines)


def tree_bytes(tree) -> float:
    return float(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def activation_bytes(kind: str, hidden: int, heads: int, layers: int, seq: int, micro_batch_per_device: int,
                     bytes_per_value: int = 2, remat: bool = False, vocab: int = 0) -> float:
    """Activation memory of one micro-batch's forward+backward on one device."""
    s, b, h, a = seq, micro_batch_per_device, hidden, heads
    per_layer = (34 * s * b * h + 5 * a * s * s * b) * (bytes_per_value / 2)
    if remat:
        stored = layers * 2 * s * b * h * (bytes_per_value / 2) + per_layer
    else:
        stored = layers * per_layer
    logits = 4.0 * s * b * vocab * 2 if kind == "decoder" else 0.0  # float32 logits and their gradient
    return float(stored + logits)


def device_capacity() -> Optional[float]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return float(stats["bytes_limit"]) if "bytes_limit" in stats else None
    except Exception:
        return None


def plan(frozen_abstract, trainable_abstract, method_abstract, *, kind: str, hidden: int, heads: int, layers: int,
         seq: int, micro_batch: int, data_parallel: int, fsdp: int, compute_bytes: int = 2, remat: bool = False,
         vocab: int = 0, capacity_bytes: Optional[float] = None, check: bool = True) -> MemoryPlan:
    """Builds the plan from abstract pytrees (jax.ShapeDtypeStruct leaves) and shapes."""
    per_device_batch = max(micro_batch // max(data_parallel * fsdp, 1), 1)
    trainable = tree_bytes(trainable_abstract)
    result = MemoryPlan(
        frozen_bytes=tree_bytes(frozen_abstract) / max(fsdp, 1),
        trainable_bytes=trainable,
        optimizer_bytes=2 * trainable,
        method_bytes=tree_bytes(method_abstract),
        activation_bytes=activation_bytes(kind, hidden, heads, layers, seq, per_device_batch, compute_bytes, remat,
                                          vocab),
        devices=data_parallel * fsdp,
        capacity_bytes=capacity_bytes if capacity_bytes is not None else device_capacity(),
    )
    if check and result.capacity_bytes and result.total > 0.92 * result.capacity_bytes:
        gib = 2 ** 30
        raise PlanDoesNotFit(
            f"the plan needs {result.total / gib:.2f} GiB per device but the device has "
            f"{result.capacity_bytes / gib:.2f} GiB (frozen {result.frozen_bytes / gib:.2f}, activations "
            f"{result.activation_bytes / gib:.2f}): raise fsdp, lower train.batch_size, or set model.remat=true")
    return result
