"""Scaling study: TreeLoRA's training step over a grid of model size x LoRA rank x number of tasks.

For each point: a random-weight Llama-shaped decoder of the given width (layers and heads scale with
it), TreeLoRA with `tasks - 1` past tasks in its bank (selection, regulariser and statistics active),
the median wall time of the jitted step, and its memory from XLA's compiled memory analysis
(arguments + outputs + temporaries of the step: deterministic, and the same quantity on CPU, GPU and
TPU). Writes `sweep.json`, `sweep.md` and one plot per axis (`sweep_<axis>.png`: time and memory
against that axis, one line per setting of the others) to --out.

    python -m experiments.sweep --out runs/sweep                                  # tiny grid, ~1 min on CPU
    python -m experiments.sweep --widths 256,576,1024 --ranks 8,32 --tasks 2,8,32 --out runs/sweep_big

Last line: a JSON object {"rows": [...], "out": DIR}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def shape_for(width: int) -> dict:
    heads = max(width // 64, 2)
    return dict(vocab_size=512, hidden_size=width, intermediate_size=4 * width, num_layers=max(width // 64, 2),
                num_heads=heads, num_kv_heads=max(heads // 2, 1), head_dim=width // heads, max_position=512)


def measure(width: int, rank: int, tasks: int, batch: int, seq: int, repeats: int) -> dict:
    from experiments.benchmarks import step_overhead
    from jaxtree_lora.train import backbone as backbone_lib

    backbone = backbone_lib.build_tiny("tiny-llama", shape_for(width), seed=0)
    step, state, frozen = step_overhead.build("treelora", backbone, past_tasks=tasks - 1, max_tasks=tasks, rank=rank)
    rng = np.random.default_rng(0)
    data = {"input_ids": jnp.asarray(rng.integers(0, 512, (1, batch, seq)), jnp.int32),
            "attention_mask": jnp.ones((1, batch, seq), jnp.int32),
            "loss_mask": jnp.ones((1, batch, seq), jnp.int32), "weight": jnp.ones((1, batch), jnp.float32)}
    consts = {"task_classes": jnp.zeros((1, 1), bool), "seen_classes": jnp.zeros((1, 1), bool)}
    compiled = step.lower(state, frozen, consts, data, jax.random.PRNGKey(0)).compile()
    analysis = compiled.memory_analysis()
    memory = None
    if analysis is not None:
        memory = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                     + analysis.temp_size_in_bytes - getattr(analysis, "alias_size_in_bytes", 0))
    initial = jax.tree.map(np.asarray, state.trainable)  # host copies: the step may donate its input
    state, metrics = step(state, frozen, consts, data, jax.random.PRNGKey(0))  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, frozen, consts, data, jax.random.PRNGKey(index + 1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"width": width, "layers": backbone.info.num_layers, "rank": rank, "tasks": tasks,
            "parameters": int(sum(np.prod(l.shape) for l in jax.tree.leaves(backbone.params))),
            "step_seconds": statistics.median(times), "step_memory_bytes": memory,
            # The timed step trains: how far its updates moved the trainable parameters (0 for a no-op step).
            "update_norm": float(np.sqrt(sum(np.sum((np.asarray(after, np.float64) - before) ** 2) for after, before
                                             in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(initial))))),
            "device": jax.devices()[0].device_kind}


def write(rows: list[dict], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "sweep.json"), os.path.join(out, "sweep.md")]
    with open(written[0], "w") as f:
        json.dump(rows, f, indent=2)
    header = "| width | layers | rank | tasks | parameters | step (ms) | step memory (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        memory = "n/a" if r["step_memory_bytes"] is None else f"{r['step_memory_bytes'] / 2 ** 20:.1f}"
        lines.append(f"| {r['width']} | {r['layers']} | {r['rank']} | {r['tasks']} | {r['parameters']:,} | "
                     f"{1000 * r['step_seconds']:.2f} | {memory} |")
    with open(written[1], "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis in ("width", "rank", "tasks"):
        others = [a for a in ("width", "rank", "tasks") if a != axis]
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        groups = sorted({tuple(r[o] for o in others) for r in rows})
        for group in groups:
            members = sorted((r for r in rows if tuple(r[o] for o in others) == group), key=lambda r: r[axis])
            label = ", ".join(f"{o} {v}" for o, v in zip(others, group))
            xs = [r[axis] for r in members]
            left.plot(xs, [1000 * r["step_seconds"] for r in members], marker="o", label=label)
            right.plot(xs, [(r["step_memory_bytes"] or 0) / 2 ** 20 for r in members], marker="o", label=label)
        left.set(xlabel=axis, ylabel="step time (ms)")
        right.set(xlabel=axis, ylabel="step memory (MiB)")
        left.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(out, f"sweep_{axis}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,128")
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--tasks", default="2,8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",") if v]
    rows = []
    for width, rank, tasks in itertools.product(ints(args.widths), ints(args.ranks), ints(args.tasks)):
        row = measure(width, rank, tasks, args.batch, args.seq, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, args.out)
    summary = {"rows": rows, "out": args.out}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
