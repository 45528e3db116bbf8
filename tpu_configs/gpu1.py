"""One GPU (H100/A100 80 GB): a 1B-8B model with LoRA in bfloat16."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mesh": [1, 1, 1],                 # (data, fsdp, tensor); product = devices in the slice
        "per_device_batch": 8,
        "accumulation": 4,
        "compute_dtype": "bfloat16",        # activations and matmuls; statistics and accumulators stay float32
        "remat": True,                  # rematerialise each block's activations in the backward pass
        "device_memory_gib": 79.6,         # H100 80 GB: 81559 MiB (the planner refuses plans over 92% of it)
    })
