"""Device meshes and sharding rules (axes `data`, `fsdp`, `tensor`).

One device is a 1x1x1 mesh: the same jitted step with the same shardings runs everywhere. Batches are
split over `data` x `fsdp`; adapters, optimiser state and method state are replicated (they are
small, and replication keeps the bandit and the tree free of collectives). The frozen backbone is
sharded by name (`backbone_sharding`): Megatron-style over `tensor` (attention q/k/v and MLP up/gate
kernels on their output axis, attention-output and MLP-down kernels on their input axis, the LM
head on the vocabulary), then FSDP over `fsdp` on the largest remaining divisible axis of big leaves
(never the stacked layer axis, which the layer scan walks). XLA SPMD inserts the collectives.
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


# Kernels stored [..., d_in, d_out]: column-parallel ones split d_out, row-parallel ones split d_in.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value",
                   "intermediate", "fc1", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj", "attn_out", "output", "fc2")


def backbone_sharding(mesh: Mesh, tree: Any, min_size: int = 2 ** 18) -> Any:
    """NamedShardings for the frozen backbone: tensor rules by parameter name, then FSDP.

    A name's tensor axis is used only when the tensor size divides it; FSDP applies to leaves with at
    least `min_size` elements, on the largest remaining axis divisible by the fsdp size, skipping the
    leading layer axis of stacked per-layer weights.
    """
    specs = backbone_specs(dict(mesh.shape), tree, min_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def backbone_specs(mesh_shape: dict, tree: Any, min_size: int = 2 ** 18) -> Any:
    """The PartitionSpecs of `backbone_sharding` for a mesh of `mesh_shape` ({axis: size}); needs no
    devices, so the memory planner can ask what a slice it is not running on would hold."""
    tensor, fsdp = mesh_shape["tensor"], mesh_shape["fsdp"]

    def rule(path, leaf):
        names = [str(getattr(entry, "key", getattr(entry, "name", ""))) for entry in path]
        name = next((n for n in reversed(names) if n not in ("value", "")), "") if names and names[-1] == "value" \
            else (names[-1] if names else "")
        stacked = "layers" in names
        shape = np.shape(leaf)
        spec = [None] * len(shape)
        base = name[:-len("_bias")] if name.endswith("_bias") else name
        if tensor > 1 and len(shape) >= 1:
            axis = None
            if base in COLUMN_PARALLEL:
                axis = len(shape) - 1
            elif base in ROW_PARALLEL and not name.endswith("_bias") and len(shape) >= 2:
                axis = len(shape) - 2
            if axis is not None and (axis > 0 or not stacked) and shape[axis] % tensor == 0:
                spec[axis] = "tensor"
        if fsdp > 1 and int(np.prod(shape)) >= min_size:
            for axis in np.argsort(shape)[::-1]:
                if spec[axis] is None and not (stacked and axis == 0) and shape[axis] % fsdp == 0:
                    spec[axis] = "fsdp"
                    break
        return P(*spec)

    return jax.tree_util.tree_map_with_path(rule, tree)


def bytes_per_device(tree: Any, specs: Any, mesh_shape: dict) -> float:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `specs`."""
    def one(leaf, spec):
        split = 1
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                split *= mesh_shape[axis] if axis else 1
        return float(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize / split

    return float(sum(jax.tree.leaves(jax.tree.map(one, tree, specs, is_leaf=lambda x: isinstance(x, P)))))


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


# -- several processes (jax.distributed) ----------------------------------------------------------

def local_batch_rows(sharding: NamedSharding, accumulation: int, micro_batch: int) -> np.ndarray:
    """Positions, in a flat global batch of accumulation x micro_batch rows, that this process loads.

    A global batch [accumulation, micro_batch, ...] is split on its micro-batch axis over the devices of
    `data` x `fsdp`; each process reads only the rows its own devices hold (one contiguous slice of
    every micro-batch, since jax.devices() lists each process's devices together), so the hosts of a
    multi-host run each load their own shard. With one process this is every row, in order.
    """
    spans = {index[1].indices(micro_batch)[:2]
             for index in sharding.addressable_devices_indices_map((accumulation, micro_batch)).values()}
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    covered = sorted(spans)
    if any(b[0] > a[1] for a, b in zip(covered, covered[1:])):
        raise MeshError(f"this process's devices hold non-contiguous batch rows {covered}: order the mesh so that "
                        f"each process's devices are neighbours on the data axes")
    return (np.arange(accumulation)[:, None] * micro_batch + np.arange(low, high)[None, :]).reshape(-1)


def global_batch(local: dict, sharding: NamedSharding, accumulation: int, micro_batch: int) -> dict:
    """This process's rows (as local_batch_rows orders them) -> global arrays [accumulation, micro_batch, ...]."""
    def one(value):
        value = np.asarray(value)
        shaped = value.reshape((accumulation, -1) + value.shape[1:])
        if jax.process_count() == 1:
            return jax.device_put(shaped, sharding)
        return jax.make_array_from_process_local_data(sharding, shaped, (accumulation, micro_batch) + value.shape[1:])

    return {key: one(value) for key, value in local.items()}


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (the same on every process) or single-device results -> arrays on `sharding`. With
    one process, arrays already on the mesh pass through untouched (no host round trip)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(value, where):
        value = np.asarray(value)
        # Each process fills only its own devices' pieces (no cross-process check of the value:
        # device_put's would compare every array between processes, and fails on NaN placeholders).
        return jax.make_array_from_callback(value.shape, where, lambda index: value[index])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda value: one(value, sharding), tree)
    return jax.tree.map(one, tree, sharding)
