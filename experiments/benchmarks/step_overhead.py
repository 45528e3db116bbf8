"""Step time of TreeLoRA (and any other method) over SeqLoRA on the same model and batch, in one run.

Every method gets the same backbone, LoRA spec, optimiser and batch. Each is measured in its
expensive regime: past tasks done (TreeLoRA: bandit selection, the regulariser and the statistics
updates all active; slot methods such as IncLoRA: every past slot applied at every site), so the
ratio is the full per-step overhead of the method. Steps alternate
between the two methods in rounds, so slow drifts of a noisy machine hit both alike; the figure is
the ratio of medians.

    python -m experiments.benchmarks.step_overhead                     # offline decoder shape + 1B shape
    python -m experiments.benchmarks.step_overhead --models smollm2   # one of: smollm2, llama1b, tiny
    python -m experiments.benchmarks.step_overhead --methods treelora_llm,inclora   # the slots' cost too
    python -m experiments.benchmarks.step_overhead --methods inclora,inclora:folded --dropout 0
        # ":folded": the past slots folded into the kernels (what a run does, `Method.fold_past`)

Last line: a JSON object with `METHOD_over_seqlora` per model and overall worst.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import StreamInfo
from jaxtree_lora.train import backbone as backbone_lib
from jaxtree_lora.train.step import TrainState, make_optimizer, make_task_loss, make_train_step

# Random-weight shapes: speed does not depend on the weights' values.
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_position=256),
    # SmolLM2-135M, the offline decoder: 30 layers, d576, 9 heads / 3 KV heads, FFN 1536, vocab 49152.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position=2048, rope_theta=100000.0, tie_embeddings=True),
    # Llama-3.2-1B: 16 layers, d2048, 32 heads / 8 KV heads, FFN 8192, vocab 128256.
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, max_position=4096, rope_theta=500000.0, tie_embeddings=True),
}


def build(method_name: str, backbone, past_tasks: int, max_tasks: int, lam: float = 0.5, rank: int = 8,
          dropout: float = 0.1):
    """(step, state, frozen weights) of `method_name` ("NAME" or "NAME:folded") after `past_tasks` tasks."""
    import dataclasses

    from jaxtree_lora.methods import get_class

    method_name, _, variant = method_name.partition(":")
    method_name = {"treelora": "treelora_llm"}.get(method_name, method_name)  # an instruction stream's form
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=rank, alpha=32.0, dropout=dropout)
    cls = get_class(method_name)
    fields = {f.name for f in __import__("dataclasses").fields(cls)}
    options = {"lora": spec}
    if "lam" in fields:
        options["lam"] = lam
    if "max_tasks" in fields:
        options["max_tasks"] = max_tasks
    method = cls(**options)
    if variant == "folded":
        method = dataclasses.replace(method, folded=True)
    stream = StreamInfo(num_tasks=max_tasks, max_tasks=max_tasks, kind="instruction")
    adapters, method_state = method.init(jax.random.PRNGKey(0), backbone.info, stream)
    optimizer = make_optimizer(ml_collections.ConfigDict({"optimizer": {
        "learning_rate": 1e-4, "b1": 0.9, "b2": 0.95, "clip_norm": 1.0, "weight_decay": 0.0,
        "schedule": "constant"}}))
    trainable = {"adapters": adapters, "head": {}}
    # Fill the bank: run begin/end of `past_tasks` tasks so that the current task has past tasks to select.
    from jaxtree_lora.methods.base import TaskContext

    for task in range(past_tasks):
        adapters, method_state = method.begin_task(trainable["adapters"], method_state, task)
        method_state = method.begin_epoch(method_state, 0, 10)
        noisy = jax.tree.map(lambda leaf: leaf + 0.01 * jax.random.normal(jax.random.PRNGKey(task), leaf.shape),
                             adapters)
        trainable = {"adapters": noisy, "head": {}}
        # one statistics update so the running average is non-zero
        aux_state = method_state
        trainable, method_state = method.end_task(trainable, aux_state, TaskContext(task=task, steps_per_epoch=10))
    adapters, method_state = method.begin_task(trainable["adapters"], method_state, past_tasks)
    method_state = method.begin_epoch(method_state, 0, 1000)
    trainable = {"adapters": adapters, "head": {}}
    state = TrainState(trainable=trainable, opt_state=optimizer.init(trainable), method_state=method_state,
                       step=jnp.zeros((), jnp.int32))
    step = jax.jit(make_train_step(method, make_task_loss(backbone, method, "instruction"), optimizer),
                   donate_argnums=(0,))
    frozen = backbone.params
    if variant == "folded":
        frozen = backbone_lib.merge_into_kernels(frozen, backbone.site_kernel, method.fold_past(adapters, method_state))
    return step, state, frozen


def measure(model: str, batch: int, seq: int, rounds: int, past_tasks: int,
            methods: tuple = ("treelora_llm",), dropout: float = 0.1) -> dict:
    backbone = backbone_lib.build_tiny("tiny-llama", SHAPES[model], seed=0)
    vocab = SHAPES[model]["vocab_size"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(1, batch, seq)).astype(np.int32)
    data = {"input_ids": jnp.asarray(tokens), "attention_mask": jnp.ones((1, batch, seq), jnp.int32),
            "loss_mask": jnp.asarray(np.concatenate([np.zeros((1, batch, seq // 2)), np.ones((1, batch, seq // 2))],
                                                    -1).astype(np.int32)),
            "weight": jnp.ones((1, batch), jnp.float32)}
    runners = {}
    for name in ("seqlora",) + tuple(m for m in methods if m != "seqlora"):
        step, state, frozen = build(name, backbone, past_tasks=past_tasks, max_tasks=past_tasks + 1,
                                    dropout=dropout)
        compile_start = time.perf_counter()
        state, metrics = step(state, frozen, {"task_classes": jnp.zeros((1, 1), bool),
                                                        "seen_classes": jnp.zeros((1, 1), bool)}, data,
                              jax.random.PRNGKey(1))
        jax.block_until_ready(metrics)
        runners[name] = {"step": step, "state": state, "frozen": frozen, "times": [],
                         "compile": time.perf_counter() - compile_start}
    consts = {"task_classes": jnp.zeros((1, 1), bool), "seen_classes": jnp.zeros((1, 1), bool)}
    for index in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner["state"], metrics = runner["step"](runner["state"], runner["frozen"], consts, data,
                                                      jax.random.PRNGKey(index))
            jax.block_until_ready(metrics)
            runner["times"].append(time.perf_counter() - start)
    medians = {name: statistics.median(r["times"]) for name, r in runners.items()}
    result = {"model": model, "batch": batch, "seq": seq, "past_tasks": past_tasks, "rounds": rounds,
              "dropout": dropout}
    for name, median in medians.items():
        result[f"{name}_step_s"] = median
    for name in medians:
        if name != "seqlora":
            result[f"{name}_over_seqlora"] = medians[name] / medians["seqlora"]
    result.update({"modules_D": backbone.info.num_layers * 2, "device": jax.devices()[0].device_kind})
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--past_tasks", type=int, default=7)
    parser.add_argument("--methods", default="treelora_llm",
                        help="comma-separated, each timed against seqlora; NAME:folded folds the past slots")
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout of every method")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    results = []
    for model in args.models.split(","):
        result = measure(model, args.batch, args.seq, args.rounds, args.past_tasks, methods, args.dropout)
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {"benchmark": "step_overhead", "results": results}
    for name in methods:
        if name != "seqlora":
            summary[f"{name}_over_seqlora"] = max(r[f"{name}_over_seqlora"] for r in results)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
