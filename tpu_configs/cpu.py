"""A laptop or CI CPU: one device, float32, no remat."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [1, 1, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 16,
        "accumulation": 1,
        "compute_dtype": "float32",        # activations and matmuls; statistics and accumulators stay float32
        "remat": False,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 0.0,          # 0: unknown (CPUs report none); the planner then only prints
    })
