"""Training throughput (tokens per second) and model-FLOPs utilisation of a LoRA train step.

Model FLOPs per token, for LoRA training of a frozen decoder with N non-embedding parameters:
forward 2N, backward 2N for the activation gradients (the frozen weights get no weight gradient),
plus attention 2 * 2 * layers * seq * hidden forward (x2 backward) and the LoRA matmuls (negligible).
MFU = achieved model FLOPs / peak FLOPs of the device (bf16 dense peak for known accelerators, or
`--peak_tflops`; on a CPU, pass the measured matmul peak if you want a meaningful MFU).

    python -m experiments.benchmarks.throughput --model llama1b --batch 8 --seq 2048 --dtype bfloat16 --remat
    python -m experiments.benchmarks.throughput --model tiny                         # CPU smoke

Last line: JSON with `tokens_per_second` and `mfu`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.step_overhead import SHAPES, build
from jaxtree_lora.train import backbone as backbone_lib

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5p": 459.0}


def model_flops_per_token(shape: dict, seq: int) -> float:
    h, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    kv = shape["num_kv_heads"] * shape["head_dim"]
    q = shape["num_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f
    logits = h * shape["vocab_size"]
    n = layers * per_layer + logits
    attention = 2 * 2 * layers * seq * q  # QK^T and AV, causal average ignored (upper bound / 2 would be exact)
    forward = 2 * n + attention
    return forward + forward  # backward: activation gradients only (frozen weights)


def peak_flops(override: float) -> float:
    if override:
        return override * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return float("nan")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--method", default="seqlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    args = parser.parse_args(argv)
    shape = SHAPES[args.model]
    compute = jnp.bfloat16 if args.dtype == "bfloat16" else None
    backbone = backbone_lib.build_tiny("tiny-llama", dict(shape, remat=args.remat) if args.remat else shape,
                                       seed=0, compute_dtype=compute)
    step, state = build(args.method, backbone, past_tasks=1 if args.method in ("treelora", "treelora_llm") else 0, max_tasks=2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], size=(1, args.batch, args.seq)).astype(np.int32)
    data = {"input_ids": jnp.asarray(tokens), "attention_mask": jnp.ones((1, args.batch, args.seq), jnp.int32),
            "loss_mask": jnp.ones((1, args.batch, args.seq), jnp.int32), "weight": jnp.ones((1, args.batch))}
    consts = {"task_classes": jnp.zeros((1, 1), bool), "seen_classes": jnp.zeros((1, 1), bool)}
    start = time.perf_counter()
    state, metrics = step(state, backbone.params, consts, data, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for index in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, backbone.params, consts, data, jax.random.PRNGKey(index))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_second = args.batch * args.seq / seconds
    achieved = tokens_per_second * model_flops_per_token(shape, args.seq)
    result = {"benchmark": "throughput", "model": args.model, "method": args.method, "batch": args.batch,
              "seq": args.seq, "dtype": args.dtype, "remat": args.remat, "step_seconds": seconds,
              "compile_seconds": compile_seconds, "tokens_per_second": tokens_per_second,
              "model_tflops_per_second": achieved / 1e12,
              # None where the device's peak is unknown (a CPU without --peak_tflops)
              "mfu": (achieved / peak_flops(args.peak_tflops)) if np.isfinite(peak_flops(args.peak_tflops)) else None,
              "device": jax.devices()[0].device_kind}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
