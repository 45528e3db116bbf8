"""TPU v5e-16 (16 chips, 16 GB HBM each): data x4, FSDP x4."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [4, 4, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 4,
        "accumulation": 2,
        "compute_dtype": "bfloat16",        # activations and matmuls; statistics and accumulators stay float32
        "remat": True,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 16.0,         # 16 GiB HBM2 per v5e chip (the planner refuses plans over 92% of it)
    })
