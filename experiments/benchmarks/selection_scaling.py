"""Per-step cost of TreeLoRA's selection + regulariser against exhaustive similarity, as K grows.

TreeLoRA's extra work per micro-step (the official path, jaxtree_lora.methods.treelora_llm): the bandit
picks one past task per module from [K, D] statistics, the regulariser R = -sum_l <A_l, G[p_l]_l>
and its gradient touch only the D selected [F] rows, and the statistics update takes D L1 distances.
That is O(K D + D F) work. The exhaustive alternative the paper argues against compares the current
full gradient over the LoRA A parameters ([D, F]) with every stored task gradient: L1 over
[K, D, F], O(K D F) work and K D F floats read per step.

Both are jitted and timed after a warm-up with block_until_ready; each figure is the median of
--repeats calls. TreeLoRA is timed through the method itself (TreeLoRA.loss under value_and_grad, then
after_step) with a constant task loss, so only the method's own work is measured.

    python -m experiments.benchmarks.selection_scaling                  # D = 64, F = 8 * 4096 (LLaMA-2-7B q/v)
    python -m experiments.benchmarks.selection_scaling --features 2048  # smaller F (quick)

A K whose bank (K * D * F float32, twice for the exhaustive input copy) would not fit in the memory
available is skipped and listed under "skipped". Last line: a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.treelora_llm import TreeLoRALLM as TreeLoRA
from jaxtree_lora.models.common import Site
from jaxtree_lora.tree import similarity, tree as tree_lib


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def timed(fn, *args, repeats: int) -> float:
    """Median wall time in ms of fn(*args) after one warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def setup(past_tasks: int, modules: int, features: int, rank: int):
    """TreeLoRA with `past_tasks` stored task vectors of [modules, features], training task K."""
    d_in = features // rank
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=rank, alpha=4.0 * rank, dropout=0.0)
    method = TreeLoRA(lora=spec, lam=0.5)
    # d_out = 8 keeps B small: B is not part of either cost.
    info = ModelInfo(sites={"attn.q_proj": Site(d_in, 8), "attn.v_proj": Site(d_in, 8)},
                     num_layers=modules // 2, feature_dim=8)
    max_tasks = past_tasks + 1
    adapters, state = method.init(jax.random.PRNGKey(0), info, StreamInfo(num_tasks=max_tasks, max_tasks=max_tasks,
                                                                          kind="instruction"))
    bank = jax.random.normal(jax.random.PRNGKey(1), (max_tasks, modules, features), jnp.float32)
    bank = bank.at[past_tasks].set(0.0)
    # The tree's shape does not change the selection's cost; build it on a slice of F to save time.
    tree = jax.jit(tree_lib.build)(bank[..., :64], jnp.asarray(past_tasks))
    state = {**state, "bank": bank, "tree": tree, "task": jnp.asarray(past_tasks, jnp.int32),
             "steps_per_epoch": jnp.asarray(100, jnp.int32), "t": jnp.asarray(10, jnp.int32),
             "counts": jnp.ones_like(state["counts"]), "sums": -jnp.ones_like(state["sums"])}
    return method, {"adapters": adapters, "head": {}}, state


def treelora_step(method):
    def task_loss(trainable, key):
        return jnp.asarray(1.0, jnp.float32), {}

    def step(trainable, state, key):
        (loss, aux), grads = jax.value_and_grad(
            lambda tr: method.loss(tr, state, {}, key, task_loss), has_aux=True)(trainable)
        new = method.after_step(state, aux, grads)
        # Return only what changes: forwarding the bank would time a 4 GiB copy, not the method.
        return loss, grads, new["running"], new["sums"], new["counts"]

    return jax.jit(step)


@jax.jit
def exhaustive(gradient, bank, valid):
    """L1 between the current [D, F] gradient and every stored [K, D, F] one; the nearest task per
    module (what an exhaustive similarity search would select)."""
    distances = similarity.pairwise(gradient, bank, "l1")
    return jnp.argmin(jnp.where(valid[:, None], distances, jnp.inf), axis=0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--past-tasks", default="8,64,512", help="comma-separated K values")
    parser.add_argument("--modules", type=int, default=64, help="D (LLaMA-2-7B q/v: 64)")
    parser.add_argument("--features", type=int, default=8 * 4096, help="F = r * d_in (LLaMA-2-7B: 8 * 4096)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.modules % 2 or args.features % args.rank:
        parser.error("--modules must be even (q and v per layer) and --features a multiple of --rank")
    results, skipped = [], []
    for past_tasks in [int(k) for k in args.past_tasks.split(",")]:
        bank_bytes = (past_tasks + 1) * args.modules * args.features * 4
        if 2.5 * bank_bytes > available_bytes():
            skipped.append({"past_tasks": past_tasks, "bank_gib": bank_bytes / 2**30,
                            "reason": "bank does not fit in the memory available"})
            print(f"K={past_tasks}: skipped, bank {bank_bytes / 2**30:.1f} GiB does not fit", flush=True)
            continue
        method, trainable, state = setup(past_tasks, args.modules, args.features, args.rank)
        tree_ms = timed(treelora_step(method), trainable, state, jax.random.PRNGKey(2), repeats=args.repeats)
        gradient = jax.random.normal(jax.random.PRNGKey(3), (args.modules, args.features), jnp.float32)
        valid = jnp.arange(past_tasks + 1) < past_tasks
        full_ms = timed(exhaustive, gradient, state["bank"], valid, repeats=args.repeats)
        row = {"past_tasks": past_tasks, "bank_gib": round(bank_bytes / 2**30, 3),
               "treelora_ms": round(tree_ms, 3), "exhaustive_ms": round(full_ms, 3),
               "exhaustive_over_treelora": round(full_ms / tree_ms, 2)}
        results.append(row)
        print(f"K={past_tasks:4d}  treelora {tree_ms:9.3f} ms  exhaustive {full_ms:9.3f} ms  "
              f"ratio {full_ms / tree_ms:8.2f}", flush=True)
        del method, trainable, state
    summary = {"benchmark": "selection_scaling", "modules": args.modules, "features": args.features,
               "repeats": args.repeats, "device": str(jax.devices()[0].device_kind),
               "platform": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "results": results, "skipped": skipped}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
