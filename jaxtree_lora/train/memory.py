"""A per-device memory plan for a model and config, built on `jax.eval_shape` (nothing is allocated).

    frozen weights      bytes of the backbone's parameters / their sharding over `fsdp` (+ the adapted
                        kernels once more where a run folds frozen slots into them, Method.fold_past)
    trainable + Adam    adapters and head, twice more for Adam's moments (replicated)
    method state        e.g. TreeLoRA's bank of task vectors [max_tasks, D, F] (replicated)
    activations         per micro-batch per device: decoder/encoder blocks after Korthikanti et al.
                        (2022): 34*s*b*h + 5*a*s^2*b bytes per layer in 16-bit, or only the block inputs
                        (2*s*b*h per layer) plus one block's worth when every block is rematerialised;
                        decoders add float32 logits over the answer window only

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
                     bytes_per_value: int = 2, remat: bool = False, vocab: int = 0,
                     answer_len: int = 0) -> float:
    """Activation memory of one micro-batch's forward+backward on one device.

    answer_len: decoder logits exist only over the answer window (the loss reads the answer
    positions only, `step.loss_positions`); 0 means over the whole sequence.
    """
    s, b, h, a = seq, micro_batch_per_device, hidden, heads
    per_layer = (34 * s * b * h + 5 * a * s * s * b) * (bytes_per_value / 2)
    if remat:
        stored = layers * 2 * s * b * h * (bytes_per_value / 2) + per_layer
    else:
        stored = layers * per_layer
    logit_positions = min(answer_len, s - 1) if answer_len else s
    logits = 4.0 * logit_positions * b * vocab * 2 if kind == "decoder" else 0.0  # float32 logits and their gradient
    return float(stored + logits)


def device_capacity() -> Optional[float]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return float(stats["bytes_limit"]) if "bytes_limit" in stats else None
    except Exception:
        return None


def plan(frozen_abstract, trainable_abstract, method_abstract, *, kind: str, hidden: int, heads: int, layers: int,
         seq: int, micro_batch: int, data_parallel: int, fsdp: int, compute_bytes: int = 2, remat: bool = False,
         vocab: int = 0, answer_len: int = 0, capacity_bytes: Optional[float] = None,
         check: bool = True) -> MemoryPlan:
    """Builds the plan from abstract pytrees (jax.ShapeDtypeStruct leaves) and shapes."""
    per_device_batch = max(micro_batch // max(data_parallel * fsdp, 1), 1)
    trainable = tree_bytes(trainable_abstract)
    result = MemoryPlan(
        frozen_bytes=tree_bytes(frozen_abstract) / max(fsdp, 1),
        trainable_bytes=trainable,
        optimizer_bytes=2 * trainable,
        method_bytes=tree_bytes(method_abstract),
        activation_bytes=activation_bytes(kind, hidden, heads, layers, seq, per_device_batch, compute_bytes, remat,
                                          vocab, answer_len),
        devices=data_parallel * fsdp,
        capacity_bytes=capacity_bytes if capacity_bytes is not None else device_capacity(),
    )
    if check:
        refuse_if_too_big(result)
    return result


def refuse_if_too_big(result: MemoryPlan, headroom: float = 0.92) -> None:
    """PlanDoesNotFit, with the numbers and the fix, when the plan needs more than `headroom` of the
    device (XLA needs the rest for its own buffers)."""
    if result.capacity_bytes and result.total > headroom * result.capacity_bytes:
        gib = 2 ** 30
        raise PlanDoesNotFit(
            f"the plan needs {result.total / gib:.2f} GiB per device but the device has "
            f"{result.capacity_bytes / gib:.2f} GiB (frozen {result.frozen_bytes / gib:.2f}, activations "
            f"{result.activation_bytes / gib:.2f}): raise fsdp, lower train.batch_size, or set model.remat=true")


# -- a plan for a run config, without loading weights or data -----------------------------------

def stream_shape(data) -> tuple[str, int, int, int]:
    """(kind, tasks, classes, sequence length) a data config describes, read from the config alone
    (the source's options in the data registry, data/sources.py; images: length 0, the ViT's token
    count comes from the model's config)."""
    from jaxtree_lora.data import DataError, sources

    chosen = sources.options(data)
    shape = chosen.shape()
    if shape is None:
        knows = ", ".join(name for name, cls in sources.SOURCES.items() if cls.shape is not sources.Source.shape)
        raise DataError(f"the planner cannot tell the shape of data source {chosen.name!r} from its config alone: "
                        f"it knows {knows}")
    return (chosen.kind, *shape)


def answer_length(data) -> int:
    """The longest answer (plus EOS) an instruction data config allows: the window the loss takes
    logits over. 0 for classification streams."""
    from jaxtree_lora.data import sources

    return sources.options(data).answer_length()


def folded_kernel_bytes(config, method, module, frozen, compute: str) -> float:
    """Bytes of the second copy of the adapted kernels a run keeps when it folds frozen slots into them
    (`backbone.folds_slots`), else 0."""
    from jaxtree_lora.train.backbone import folds_slots, site_kernels

    sites = lambda: method.lora.select(module.lora_sites())
    if not folds_slots(config, method, frozen, module.site_kernel, sites, compute):
        return 0.0
    return tree_bytes(list(site_kernels(frozen, module.site_kernel, sites()).values()))


def plan_run(config, capacity_bytes: Optional[float] = None, check: bool = True) -> MemoryPlan:
    """The per-device plan of `config` (a run config, tpu_config applied): the backbone from its config
    file only (backbone.abstract_module), adapters and method state from `jax.eval_shape` of the
    method's init, frozen weights laid out by the mesh's sharding rules (train.mesh.backbone_specs),
    activations by the formula above. Refuses (PlanDoesNotFit) when it needs more than 92% of
    `capacity_bytes` (default: train.device_memory_gib, else what the local device reports)."""
    from jaxtree_lora.methods.base import ModelInfo, StreamInfo
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train import mesh as mesh_lib
    from jaxtree_lora.assemble import method_from_config
    from jaxtree_lora.models.heads import init_head

    module, kind = backbone_lib.abstract_module(config)
    from flax import nnx

    frozen = nnx.state(module)
    model_config = module.config
    feature_dim = getattr(module, "feature_dim", None) or model_config.hidden_size
    info = ModelInfo(sites=module.lora_sites(), num_layers=model_config.num_layers, feature_dim=feature_dim)
    stream_kind, tasks, classes, seq = stream_shape(config.data)
    if kind == "vit":
        seq = (model_config.image_size // model_config.patch_size) ** 2 + 1
    max_tasks = max(int(config.train.get("max_tasks", 0) or 0), tasks)
    method = method_from_config(config, stream_kind, max_tasks)  # the run's method, in the form it runs
    stream_info = StreamInfo(num_tasks=tasks, max_tasks=max_tasks, kind=stream_kind, num_classes=classes)
    key = jax.random.PRNGKey(0)
    adapters, method_state = jax.eval_shape(lambda k: method.init(k, info, stream_info), key)
    head = jax.eval_shape(lambda k: init_head(k, feature_dim, classes), key) if stream_kind == "classification" else {}
    mesh = list(config.train.get("mesh", ()) or ()) or [1, 1, 1]
    mesh_shape = dict(zip(mesh_lib.AXES, (int(m) for m in mesh)))
    specs = mesh_lib.backbone_specs(mesh_shape, frozen, int(config.train.get("fsdp_min_size", 2 ** 18)))
    compute = str(config.model.get("compute_dtype", "float32") or "float32")
    if capacity_bytes is None:
        gib = float(config.train.get("device_memory_gib", 0.0) or 0.0)
        capacity_bytes = gib * 2 ** 30 if gib > 0 else None
    result = plan(frozen, {"adapters": adapters, "head": head}, method_state, kind=kind,
                  hidden=model_config.hidden_size, heads=model_config.num_heads, layers=model_config.num_layers,
                  seq=seq, micro_batch=int(config.train.batch_size), data_parallel=mesh_shape["data"],
                  fsdp=mesh_shape["fsdp"], compute_bytes=2 if compute == "bfloat16" else 4,
                  remat=bool(config.model.get("remat", False)),
                  vocab=int(getattr(model_config, "vocab_size", 0) or 0) if kind == "decoder" else 0,
                  answer_len=answer_length(config.data), capacity_bytes=capacity_bytes, check=False)
    result.frozen_bytes = mesh_lib.bytes_per_device(frozen, specs, mesh_shape) + folded_kernel_bytes(
        config, method, module, frozen, compute) / max(mesh_shape["fsdp"], 1)
    result.devices = int(np.prod(mesh))
    if check:
        refuse_if_too_big(result)
    return result
