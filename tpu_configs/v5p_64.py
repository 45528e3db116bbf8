"""TPU v5p-64 (32 chips across hosts): data x4, FSDP x8; run one process per host."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [4, 8, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 4,
        "accumulation": 1,
        "compute_dtype": "bfloat16",        # activations and matmuls; statistics and accumulators stay float32
        "remat": True,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 95.0,         # 95 GiB HBM2e per v5p chip (the planner refuses plans over 92% of it)
    })
