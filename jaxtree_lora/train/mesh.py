"""Device meshes and sharding rules (axes `data`, `fsdp`, `tensor`).

One device is a 1x1x1 mesh: the same jitted step with the same shardings runs everywhere. Batches are
split over `data` x `fsdp`; adapters, optimiser state and method state are replicated (they are
small, and replication keeps the bandit and the tree free of collectives); the frozen backbone is
replicated by default, or FSDP-sharded on the largest divisible axis of big kernels.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    pass


def make_mesh(shape: Sequence[int] = (), devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; an empty shape puts every device on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    if not shape:
        shape = (len(devices), 1, 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise MeshError(f"mesh shape {shape} must have 3 entries (data, fsdp, tensor)")
    if int(np.prod(shape)) != len(devices):
        raise MeshError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, {len(devices)} are visible")
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_accum_axis: bool = True) -> NamedSharding:
    """Micro-batches [accum, batch, ...] split on the batch axis over data x fsdp."""
    spec = P(None, ("data", "fsdp")) if leading_accum_axis else P(("data", "fsdp"))
    return NamedSharding(mesh, spec)


def fsdp_sharding(mesh: Mesh, tree: Any, min_size: int = 2 ** 18) -> Any:
    """Shards each big leaf on its largest axis divisible by the fsdp size (big_vision's rule)."""
    size = mesh.shape["fsdp"]

    def rule(leaf):
        shape = np.shape(leaf)
        if size == 1 or int(np.prod(shape)) < min_size:
            return replicated(mesh)
        for axis in np.argsort(shape)[::-1]:
            if shape[axis] % size == 0:
                spec = [None] * len(shape)
                spec[axis] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree.map(rule, tree)
