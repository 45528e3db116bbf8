"""TPU v4-8 (4 chips): FSDP over all chips, the frozen base sharded, adapters replicated."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [1, 4, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 8,
        "accumulation": 2,
        "compute_dtype": "bfloat16",        # activations and matmuls; statistics and accumulators stay float32
        "remat": True,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 32.0,         # 32 GiB HBM2 per v4 chip (the planner refuses plans over 92% of it)
    })
