"""LoRA train-step time side by side: this project (JAX) against PyTorch + PEFT, in one run.

Same models and weights, same batch, LoRA r 8 (alpha 32, dropout 0.1) on the same two projections
(query/value resp. q_proj/v_proj), float32, Adam with global-norm clipping 1.0. Steps alternate
between the two frameworks in rounds, so the slow drifts of a shared machine hit both alike; the
figures are medians after warm-up and the speed-up is the ratio of medians.

  minilm    all-MiniLM-L6-v2 (real weights: the offline asset into transformers' BertModel), batch
            32 x 64 tokens (all real), mean pooling and a 2-class head, cross-entropy.
  smollm2   SmolLM2-135M (real weights: the offline GGUF dequantised once, copied into transformers'
            LlamaForCausalLM), batch 4 x 128, an instruction batch: loss on the last 16 tokens (the
            answer), labels -100 elsewhere as TRACE sets them. PEFT computes logits at every
            position (LlamaForCausalLM's default); this project over the answer window.
  epoch     the default main job's real-data epoch: offline-text-cil task 1's train split (192 texts),
            MiniLM, batch 16, the same shuffled batches; here packed as the run packs them
            (`data.packing`: several texts per 128-wide row, attention within each text), in the
            PEFT loop padded to each batch's longest row (what DataCollatorWithPadding does).
            Timed per epoch after one warm-up epoch (which compiles every row count here).
  dinov2    the README's main job's step: DINOv2 ViT-S/14 (real weights: the offline ONNX asset into
            transformers' Dinov2Model) at 84 px (37 tokens), batch 16, a 2-class head on [CLS], and
            HiDe-LoRA's spec on both sides: rank 4, alpha 1, no dropout, key and value of blocks 0-4.

PyTorch runs with torch.set_num_threads(--threads); JAX with its defaults (every core).

`--dtype bfloat16` runs both sides in bf16 mixed precision with the frozen weights kept float32: ours
with `model.compute_dtype=bfloat16` (`--remat` for `model.remat`, which bf16 on CPU does anyway),
PEFT under `torch.autocast("cpu", dtype=torch.bfloat16)`, its standard mixed precision. The LoRA
parameters and Adam stay float32 on both sides.

    python -m experiments.benchmarks.versus_peft                      # all four rows
    python -m experiments.benchmarks.versus_peft --rows minilm --steps 5 --warmup 1   # quick
    python -m experiments.benchmarks.versus_peft --dtype bfloat16                    # bf16 on both sides
    python -m experiments.benchmarks.versus_peft --dtype bfloat16 --peft_dtype float32  # each at its fastest

`--peft_dtype` sets PEFT's side alone: on the development box torch's bf16 autocast is slower than
its float32 (SmolLM2 1.8-2.1 s against 1.5-1.7), so a CPU user of PEFT would train in float32.

Needs the `bench` extra (torch, peft): without them it prints one line and exits with status 2.
Last line: a JSON object with each row's step (or epoch) times and `speedup` (PEFT time / ours).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

RANK, ALPHA, DROPOUT = 8, 32.0, 0.1


def _autocast(dtype: str):
    """torch's mixed precision for `--dtype bfloat16` (matmuls in bf16, weights kept float32), else nothing."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def _need_torch():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"versus_peft needs torch and peft ({error}): pip install -e '.[bench]'")
        sys.exit(2)


# -- this project ---------------------------------------------------------------------------------
def jax_runner(backbone, kind: str, targets: tuple, num_classes: int = 0, answer_window=None, spec=None):
    """(step(batch) -> None, blocking) for a plain-LoRA (SeqLoRA) train step on `backbone`; `spec`: a
    `lora.LoraSpec` (default: rank RANK, alpha ALPHA, dropout DROPOUT on `targets`)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from jaxtree_lora import lora as lora_lib
    from jaxtree_lora.methods.base import StreamInfo
    from jaxtree_lora.methods.seqlora import SeqLoRA
    from jaxtree_lora.models.heads import init_head
    from jaxtree_lora.train.step import TrainState, make_optimizer, make_task_loss, make_train_step

    method = SeqLoRA(lora=spec or lora_lib.LoraSpec(targets=targets, rank=RANK, alpha=ALPHA, dropout=DROPOUT))
    adapters, method_state = method.init(jax.random.PRNGKey(0), backbone.info,
                                         StreamInfo(num_tasks=1, max_tasks=1, kind=kind, num_classes=num_classes))
    head = init_head(jax.random.PRNGKey(1), backbone.info.feature_dim, num_classes) if num_classes else {}
    optimizer = make_optimizer(ml_collections.ConfigDict({"optimizer": {
        "learning_rate": 1e-4, "b1": 0.9, "b2": 0.999, "clip_norm": 1.0, "weight_decay": 0.0,
        "schedule": "constant"}}))
    trainable = {"adapters": adapters, "head": head}
    state = [TrainState(trainable=trainable, opt_state=optimizer.init(trainable), method_state=method_state,
                        step=jnp.zeros((), jnp.int32))]
    loss = make_task_loss(backbone, method, kind, head="linear", answer_window=answer_window)
    step = jax.jit(make_train_step(method, loss, optimizer), donate_argnums=(0,))
    consts = {"task_classes": jnp.ones((1, max(num_classes, 1)), bool),
              "seen_classes": jnp.ones((1, max(num_classes, 1)), bool)}
    counter = [0]

    def run(batch: dict):
        device_batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
        counter[0] += 1
        state[0], metrics = step(state[0], backbone.params, consts, device_batch, jax.random.PRNGKey(counter[0]))
        jax.block_until_ready(metrics)

    return run


# -- PyTorch + PEFT -------------------------------------------------------------------------------
def torch_bert(num_classes: int, dtype: str = "float32"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    from jaxtree_lora import assets

    # Dropout off inside BERT: this project's encoder has none (LoRA dropout is on in both).
    model = BertModel.from_pretrained(str(assets.ensure("minilm")), hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, add_pooling_layer=False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=["query", "value"]))
    head = torch.nn.Linear(model.config.hidden_size, num_classes)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    model.train()

    def run(batch: dict):
        ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
        mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
        with _autocast(dtype):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            loss = torch.nn.functional.cross_entropy(head(pooled).float(),
                                                     torch.from_numpy(np.asarray(batch["labels"], np.int64)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def torch_llama(jax_module, dtype: str = "float32"):
    """LlamaForCausalLM with the JAX decoder's (real, dequantised) weights copied in."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = jax_module.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, max_position_embeddings=c.max_position,
                         tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    layers = jax_module.layers.as_dict()
    state = {"model.embed_tokens.weight": np.asarray(jax_module.embed[...]),
             "model.norm.weight": np.asarray(jax_module.final_norm[...])}
    if not c.tie_embeddings:
        state["lm_head.weight"] = np.asarray(jax_module.lm_head[...]).T
    for layer in range(c.num_layers):
        prefix = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{name}.weight"] = np.asarray(layers[name][layer]).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[prefix + f"mlp.{name}.weight"] = np.asarray(layers[name][layer]).T
        state[prefix + "input_layernorm.weight"] = np.asarray(layers["input_norm"][layer])
        state[prefix + "post_attention_layernorm.weight"] = np.asarray(layers["post_norm"][layer])
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32, copy=True))
                                                 for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights not copied: missing {missing}, unexpected {unexpected}")
    # The copy is checked, not assumed: both models' logits on one short sequence.
    probe = np.arange(1, 9, dtype=np.int32)[None] * 37
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(probe.astype(np.int64))).logits.numpy()
    check = float(np.abs(np.asarray(jax_module(probe)) - theirs).max())
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    model.train()

    def run(batch: dict):
        ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
        mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
        labels = ids.masked_fill(torch.from_numpy(np.asarray(batch["loss_mask"]) == 0), -100)
        with _autocast(dtype):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, check


def torch_dinov2(tensors: dict, config, num_classes: int, rank: int, alpha: float, layers: list,
                 dtype: str = "float32"):
    """transformers' Dinov2Model with the offline asset's weights (HF names, torch layout) and PEFT LoRA
    on key and value of `layers`, a linear head on the [CLS] feature (after the final LayerNorm)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Dinov2Config, Dinov2Model

    grid = int(round((tensors["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    model = Dinov2Model(Dinov2Config(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                                     num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                                     patch_size=config.patch_size, image_size=grid * config.patch_size,
                                     layer_norm_eps=config.layer_norm_eps, hidden_act="gelu", qkv_bias=True))
    # transformers 5 names the attention projections q_proj, k_proj, v_proj, o_proj (HF checkpoints, as
    # the asset, keep attention.attention.query ... and attention.output.dense).
    renamed = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
               "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
    modern = any(".attention.q_proj." in name for name in model.state_dict())
    state = {}
    for name, value in tensors.items():
        if name == "embeddings.mask_token":
            continue
        for old, new in (renamed.items() if modern else ()):
            name = name.replace(old, new)
        state[name] = torch.from_numpy(np.array(value, np.float32, copy=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "embeddings.mask_token"]
    if missing or unexpected:
        raise RuntimeError(f"weights not copied: missing {missing}, unexpected {unexpected}")
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                             target_modules=["k_proj", "v_proj"] if modern else ["key", "value"],
                                             layers_to_transform=layers))
    head = torch.nn.Linear(config.hidden_size, num_classes)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    model.train()

    def features(pixels):
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0]

    def run(batch: dict):
        with _autocast(dtype):
            loss = torch.nn.functional.cross_entropy(head(features(batch["pixels"])).float(),
                                                     torch.from_numpy(np.asarray(batch["labels"], np.int64)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, features


# -- measuring ------------------------------------------------------------------------------------
def alternate(runners: dict, batches, warmup: int, rounds: int) -> dict:
    """Median seconds per call of each runner; calls alternate runner by runner, round by round.
    `batches(name, index)` gives the batch (or list of batches: one timed unit) of a round."""
    times = {name: [] for name in runners}
    for index in range(warmup + rounds):
        for name, run in runners.items():
            units = batches(name, index)
            start = time.perf_counter()
            for batch in units:
                run(batch)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def row_minilm(args) -> dict:
    import torch

    from jaxtree_lora.train import backbone as backbone_lib

    import ml_collections

    backbone = backbone_lib.build(ml_collections.ConfigDict({"model": model_config("minilm", args), "seed": 0}))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 20000, (32, 64)).astype(np.int32),
             "attention_mask": np.ones((32, 64), np.int32), "labels": rng.integers(0, 2, 32).astype(np.int32),
             "weight": np.ones((32,), np.float32)}
    torch.set_num_threads(args.threads)
    runners = {"ours": jax_runner(backbone, "classification", ("attn.query", "attn.value"), num_classes=2),
               "peft": torch_bert(2, peft_dtype(args))}
    medians = alternate(runners, lambda name, index: [batch], args.warmup, args.steps)
    return {"row": "minilm", "batch": [32, 64], "ours_step_s": medians["ours"], "peft_step_s": medians["peft"],
            "speedup": medians["peft"] / medians["ours"], "weights": "real (offline asset)"}


def row_smollm2(args) -> dict:
    import ml_collections
    import torch

    from jaxtree_lora.train import backbone as backbone_lib

    backbone = backbone_lib.build(ml_collections.ConfigDict({"model": model_config("smollm2", args), "seed": 0}))
    rng = np.random.default_rng(0)
    seq, answer = 128, 16
    loss_mask = np.zeros((4, seq), np.int32)
    loss_mask[:, seq - answer:] = 1
    batch = {"input_ids": rng.integers(100, 40000, (4, seq)).astype(np.int32),
             "attention_mask": np.ones((4, seq), np.int32), "loss_mask": loss_mask,
             "weight": np.ones((4,), np.float32)}
    torch.set_num_threads(args.threads)
    peft_run, logit_difference = torch_llama(backbone.module(), peft_dtype(args))
    runners = {"ours": jax_runner(backbone, "instruction", ("attn.q_proj", "attn.v_proj"), answer_window=answer),
               "peft": peft_run}
    medians = alternate(runners, lambda name, index: [batch], args.warmup, args.steps)
    return {"row": "smollm2", "batch": [4, seq], "answer_tokens": answer, "ours_step_s": medians["ours"],
            "peft_step_s": medians["peft"], "speedup": medians["peft"] / medians["ours"],
            "weights": "real (offline GGUF, dequantised, copied into the torch model)",
            "copied_weights_max_logit_difference": logit_difference}


def row_epoch(args) -> dict:
    import ml_collections
    import torch

    from experiments.configs.default import get_config
    from jaxtree_lora.data import batching, get_stream, packing
    from jaxtree_lora.train import backbone as backbone_lib

    config = get_config()
    backbone = backbone_lib.build(ml_collections.ConfigDict({"model": model_config("minilm", args), "seed": 0}))
    stream = get_stream(config.data, backbone.tokenizer)
    task = stream.tasks[0]
    arrays = dict(task.train.inputs, labels=np.asarray(task.train.labels, np.int32))
    size = int(config.train.batch_size)
    packer = packing.Packer(size)
    ours_epoch = [packer(batch) for batch in batching.batches(arrays, size, seed=0, task=0, epoch=0)]
    peft_epoch = []
    for batch in batching.batches(arrays, size, seed=0, task=0, epoch=0):
        longest = int(batch["attention_mask"].sum(1).max())  # DataCollatorWithPadding: pad to the longest
        peft_epoch.append({**batch, "input_ids": batch["input_ids"][:, :longest],
                           "attention_mask": batch["attention_mask"][:, :longest]})
    # The labels are global class ids: remap to 0..1 for a 2-class head on both sides.
    classes = sorted(set(int(c) for c in arrays["labels"]))
    for epoch in (ours_epoch, peft_epoch):
        for batch in epoch:
            batch["labels"] = np.searchsorted(classes, batch["labels"]).astype(np.int32)
    torch.set_num_threads(args.threads)
    runners = {"ours": jax_runner(backbone, "classification", ("attn.query", "attn.value"), num_classes=2),
               "peft": torch_bert(2, peft_dtype(args))}
    epochs = {"ours": ours_epoch, "peft": peft_epoch}
    medians = alternate(runners, lambda name, index: epochs[name], 1, args.epochs)
    return {"row": "epoch", "task": task.name, "rows": int(len(arrays["labels"])), "batch": size,
            "batches": len(ours_epoch), "real_tokens": int(sum(b["attention_mask"].sum() for b in peft_epoch)),
            "ours_token_slots": int(sum(b["input_ids"].size for b in ours_epoch)),
            "peft_token_slots": int(sum(b["input_ids"].size for b in peft_epoch)),
            "ours_rows_per_batch": float(np.mean([b["input_ids"].shape[0] for b in ours_epoch])),
            "ours_epoch_s": medians["ours"], "peft_epoch_s": medians["peft"],
            "speedup": medians["peft"] / medians["ours"]}


def row_dinov2(args) -> dict:
    """The README's main job's step: DINOv2 ViT-S/14 (the offline asset) at 84 px (37 tokens), batch 16,
    HiDe-LoRA's spec (rank 4, alpha 1, k and v of the first 5 blocks, no dropout). Ours takes the
    stored 28 px uint8 images and resizes and normalises inside the step, as the run does; torch takes
    84 px float pixels prepared on the host beforehand (a DataLoader's work, not timed)."""
    import jax
    import ml_collections
    import torch

    from jaxtree_lora import assets
    from jaxtree_lora import lora as lora_lib
    from jaxtree_lora.models import dinov2
    from jaxtree_lora.train import backbone as backbone_lib

    size, rank, alpha, blocks = 84, 4, 1.0, 5
    backbone = backbone_lib.build(ml_collections.ConfigDict(
        {"model": model_config("dinov2_small", args), "data": {"image_size": size}, "seed": 0}))
    config = backbone.module().config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 28, 28, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, 16).astype(np.int32)
    resized = np.asarray(jax.image.resize(images.astype(np.float32) / 255.0, (16, size, size, 3), "bilinear"))
    pixels = ((resized - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32))
    pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    torch.set_num_threads(args.threads)
    tensors, _ = dinov2.onnx_tensors(str(assets.ensure("dinov2_small")))
    peft_run, torch_features = torch_dinov2(tensors, config, 2, rank, alpha, list(range(blocks)), peft_dtype(args))
    # The copy is checked, not assumed: both models' [CLS] features on the batch (torch's in float32, ours
    # in the run's dtype: under bf16 within 5% of their largest feature).
    with torch.no_grad():
        theirs = torch_features(pixels).numpy()
    ours = np.asarray(backbone.features(backbone.params, {"images": images}), np.float32)
    tolerance = 1e-3 if args.dtype == "float32" else 0.05 * float(np.abs(theirs).max())
    if np.abs(ours - theirs).max() > tolerance:
        raise RuntimeError(f"the torch copy's features differ from ours by {np.abs(ours - theirs).max():.2e}")
    spec = lora_lib.LoraSpec(targets=("k", "v"), rank=rank, alpha=alpha, dropout=0.0, max_modules=2 * blocks)
    runners = {"ours": jax_runner(backbone, "classification", ("k", "v"), num_classes=2, spec=spec),
               "peft": peft_run}
    batches = {"ours": {"images": images, "labels": labels, "weight": np.ones((16,), np.float32)},
               "peft": {"pixels": pixels, "labels": labels}}
    medians = alternate(runners, lambda name, index: [batches[name]], args.warmup, args.steps)
    return {"row": "dinov2", "batch": [16, size, size], "tokens": (size // config.patch_size) ** 2 + 1,
            "lora": f"r {rank}, alpha {alpha}, k and v of blocks 0-{blocks - 1}", "ours_step_s": medians["ours"],
            "peft_step_s": medians["peft"], "speedup": medians["peft"] / medians["ours"],
            "weights": "real (offline ONNX asset, copied into transformers' Dinov2Model)",
            "copied_weights_max_feature_difference": float(np.abs(ours - theirs).max())}


def peft_dtype(args) -> str:
    """PEFT's compute dtype: `--peft_dtype`, else the run's `--dtype`."""
    return getattr(args, "peft_dtype", None) or args.dtype


def model_config(name: str, args) -> dict:
    """The backbone's config at the run's compute dtype (`--dtype`) and remat (`--remat`)."""
    return {"name": name, "compute_dtype": args.dtype, "remat": bool(args.remat)}


ROWS = {"minilm": row_minilm, "smollm2": row_smollm2, "epoch": row_epoch, "dinov2": row_dinov2}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="minilm,smollm2,epoch,dinov2", help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per framework (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per framework first (compiles)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per framework in the epoch row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype: ours model.compute_dtype, PEFT torch.autocast (weights float32 on both)")
    parser.add_argument("--peft_dtype", default=None, choices=("float32", "bfloat16"),
                        help="PEFT's compute dtype when it differs from ours (each side at its fastest)")
    parser.add_argument("--remat", action="store_true", help="ours: model.remat (blocks recomputed in the backward)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        print(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
        sys.exit(2)
    _need_torch()
    import jax
    import peft
    import torch

    results = []
    for name in names:
        result = ROWS[name](args)
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {"benchmark": "versus_peft", "results": results, "torch": torch.__version__, "peft": peft.__version__,
               "jax": jax.__version__,
               "torch_threads": args.threads, "device": jax.devices()[0].device_kind, "dtype": args.dtype,
               "peft_dtype": peft_dtype(args), "remat": bool(args.remat)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
