"""One file per accelerator slice: mesh shape, per-device batch, accumulation, dtypes, remat.

`jaxtree-lora run --tpu_config NAME` applies a file's settings on top of the run config:
`train.mesh`, `train.batch_size` (= per-device batch x data-parallel devices), `train.accumulation`,
`model.compute_dtype`, `model.remat` and `train.device_memory_gib` (for the memory planner).
"""
import importlib
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_"))


def load(name: str) -> ml_collections.ConfigDict:
    if name not in names():
        raise FileNotFoundError(f"no tpu_config {name!r}: choose one of {', '.join(names())}")
    return importlib.import_module(f"tpu_configs.{name}").get_config()


def apply(config: ml_collections.ConfigDict, slice_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    data, fsdp, tensor = slice_config.mesh
    config.train.mesh = list(slice_config.mesh)
    config.train.batch_size = int(slice_config.per_device_batch) * data * fsdp
    config.train.accumulation = int(slice_config.accumulation)
    config.model.compute_dtype = slice_config.compute_dtype
    config.model.remat = bool(slice_config.remat)
    config.train.device_memory_gib = float(slice_config.get("device_memory_gib", 0.0) or 0.0)
    return config
