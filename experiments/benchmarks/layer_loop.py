"""How a stack of layers is looped over, on its own: `lax.scan` over stacked weights [L, ...] (what the
models do, `models.common.scan_layers`), a Python loop slicing the stacked weights, and a Python loop
over weights held as separate per-layer arrays. A residual SwiGLU-free MLP block (x + act(x W1) W2),
forward at a decode-like row count and forward + backward (gradients of a rank-8 LoRA-like term only,
the frozen weights never differentiated) at a training-like one.

    python -m experiments.benchmarks.layer_loop                          # SmolLM2-like decode, MiniLM-like step
    python -m experiments.benchmarks.layer_loop --layers 6 --width 384 --inner 1536 --rows 2048

Last line: a JSON object {case: {loop: milliseconds}} (median of `--repeats` calls after a warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def block(x, w1, w2, a):
    """x + gelu(x W1 + x A A^T W1) W2: one frozen MLP with a rank-r term whose A is trained."""
    return x + jax.nn.gelu(x @ w1 + ((x @ a) @ a.T) @ w1) @ w2


def loops(layers: int):
    """{name: f(A [L, d, r], x, W1, W2) -> x}: the three ways of looping over the layers."""
    def scanned(adapters, x, w1, w2):
        return jax.lax.scan(lambda h, ws: (block(h, *ws), None), x, (w1, w2, adapters))[0]

    def sliced(adapters, x, w1, w2):
        for layer in range(layers):
            x = block(x, w1[layer], w2[layer], adapters[layer])
        return x

    def separate(adapters, x, w1s, w2s):
        for layer in range(layers):
            x = block(x, w1s[layer], w2s[layer], adapters[layer])
        return x

    return {"scan over stacked": scanned, "loop slicing stacked": sliced, "loop over separate arrays": separate}


def timed(function, arguments, repeats: int) -> float:
    jax.block_until_ready(function(*arguments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="one case with these shapes (0: the two default cases)")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--inner", type=int, default=1536)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--backward", action="store_true", help="forward + backward (the LoRA term's gradient)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    cases = ([(args.layers, args.width, args.inner, args.rows, args.backward)] if args.layers else
             [(30, 576, 1536, 1, False), (30, 576, 1536, 24, False), (6, 384, 1536, 2048, True)])
    out = {}
    for layers, width, inner, rows, backward in cases:
        key = jax.random.PRNGKey(0)
        w1 = 0.02 * jax.random.normal(key, (layers, width, inner))
        w2 = 0.02 * jax.random.normal(jax.random.fold_in(key, 1), (layers, inner, width))
        adapters = 0.01 * jax.random.normal(jax.random.fold_in(key, 2), (layers, width, 8))
        x = jax.random.normal(jax.random.fold_in(key, 3), (rows, width))
        separate = ([w1[layer] + 0 for layer in range(layers)], [w2[layer] + 0 for layer in range(layers)])
        name = f"{layers} layers {width}x{inner}, {rows} rows, {'forward + backward' if backward else 'forward'}"
        out[name] = {}
        for loop, function in loops(layers).items():
            if backward:
                function = jax.grad(lambda a, *rest, f=function: jnp.sum(f(a, *rest) ** 2))
            weights = separate if loop == "loop over separate arrays" else (w1, w2)
            out[name][loop] = round(timed(jax.jit(function), (adapters, x, *weights), args.repeats), 2)
        print(name, out[name], flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
