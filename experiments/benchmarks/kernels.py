"""The two kernels under every train step, on their own: float32 matmuls (XLA CPU against torch) and
threefry draws (JAX's CPU lowering against this project's, `jaxtree_lora.threefry`).

  matmul    the step's GEMM shapes (MiniLM 2048 tokens x 384 / 1536, SmolLM2 512 tokens x 576 / 1536,
            its LM head over 49152 words, HiDe's TII head at batch 16: 16 x 384 x 768), each as forward
            (x W), input gradient (g W^T) and weight gradient (x^T g): GFLOP/s of a jitted `jnp` product
            and of torch's (`torch.set_num_threads(--threads)`; torch rows are left out without the
            `bench` extra).
  threefry  a [20, 120, 384] normal draw (HiDe's alignment samples) and a [32, 64, 384] Bernoulli mask,
            milliseconds: in a child process with JAX's own lowering (a rolled loop on CPU) and one with
            `jaxtree_lora.threefry` imported; `same_bits` checks the draws agree.

    python -m experiments.benchmarks.kernels
    python -m experiments.benchmarks.kernels --rows threefry --repeats 5

Last line: a JSON object {"matmul": {shape: {pass: {"jax": GFLOP/s, "torch": GFLOP/s}}}, "threefry": ...}
(medians of `--repeats` calls after a warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = ((2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384), (512, 576, 1536), (512, 1536, 576),
          (512, 576, 49152), (16, 384, 768))

DRAWS = """
import hashlib, json, statistics, sys, time
import jax, numpy as np
if {ours}:
    import jaxtree_lora.threefry
draws = {{"normal [20, 120, 384]": jax.jit(lambda k: jax.random.normal(k, (20, 120, 384))),
          "bernoulli [32, 64, 384]": jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (32, 64, 384)))}}
key = jax.random.PRNGKey(0)
out = {{}}
for name, draw in draws.items():
    first = np.asarray(draw(key))
    times = []
    for _ in range({repeats}):
        start = time.perf_counter(); draw(key).block_until_ready(); times.append(time.perf_counter() - start)
    out[name] = (1e3 * statistics.median(times), hashlib.sha256(first.tobytes()).hexdigest())
print(json.dumps(out))
"""


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rows(shapes, repeats: int, threads: int) -> dict:
    """{"m x k x n": {"forward" | "input gradient" | "weight gradient": {"jax": GFLOP/s, "torch": ...}}}."""
    import jax
    import jax.numpy as jnp
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    products = {"forward": (lambda x, w, g: x @ w), "input gradient": (lambda x, w, g: g @ w.T),
                "weight gradient": (lambda x, w, g: x.T @ g)}
    rng = np.random.default_rng(0)
    table = {}
    for m, k, n in shapes:
        x, w, g = (rng.standard_normal(shape, dtype=np.float32) for shape in ((m, k), (k, n), (m, n)))
        gflop = 2 * m * k * n / 1e9
        arrays = tuple(jnp.asarray(a) for a in (x, w, g))
        tensors = None if torch is None else tuple(torch.from_numpy(a) for a in (x, w, g))
        row = {}
        for name, product in products.items():
            jitted = jax.jit(product)
            row[name] = {"jax": gflop / _median_seconds(lambda: jitted(*arrays).block_until_ready(), repeats)}
            if tensors is not None:
                with torch.no_grad():
                    row[name]["torch"] = gflop / _median_seconds(lambda: product(*tensors), repeats)
        table[f"{m} x {k} x {n}"] = row
    return table


def threefry_rows(repeats: int) -> dict:
    """{draw: {"jax lowering ms", "ours ms", "same_bits"}}, each side in its own child process."""
    sides = {}
    for side, ours in (("jax lowering", False), ("ours", True)):
        result = subprocess.run([sys.executable, "-c", DRAWS.format(ours=ours, repeats=repeats)],
                                capture_output=True, text=True, check=True)
        sides[side] = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: {"jax lowering ms": sides["jax lowering"][name][0], "ours ms": sides["ours"][name][0],
                   "same_bits": sides["jax lowering"][name][1] == sides["ours"][name][1]}
            for name in sides["ours"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="matmul,threefry", help="comma-separated: matmul, threefry")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--shapes", default="", help="m,k,n;m,k,n... instead of the step's shapes")
    args = parser.parse_args(argv)
    shapes = (tuple(tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")) if args.shapes
              else SHAPES)
    out = {}
    rows = args.rows.split(",")
    if "matmul" in rows:
        out["matmul"] = matmul_rows(shapes, args.repeats, args.threads)
    if "threefry" in rows:
        out["threefry"] = threefry_rows(args.repeats)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
