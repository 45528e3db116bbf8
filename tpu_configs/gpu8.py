"""Eight GPUs in one host: data parallel x2, FSDP x4 over the frozen weights."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [2, 4, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 4,
        "accumulation": 2,
        "compute_dtype": "bfloat16",        # activations and matmuls; statistics and accumulators stay float32
        "remat": True,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 79.6,         # H100 80 GB each (the planner refuses plans over 92% of it)
    })
