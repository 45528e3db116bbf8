"""TreeLoRA on Split CIFAR-100 (10 tasks x 10 classes) with ViT-B/16, the paper's ViT setting.

Paper (arXiv 2506.10355, App. A.3, Table 6; docs/METHODS.md): TreeLoRA built into HiDe-LoRA's
task decomposition (per-task LoRA slots on k and v of the first 5 blocks, task-identity inference from
the pre-trained model, classifier alignment on class statistics; `method.treelora.form` "auto" picks
it on this classification stream); Adam(0.9, 0.999); batch 192; constant lr 0.005; 20 epochs per
task; 224x224 inputs; lambda 0.1; tree depth 5 (= HiDe-LoRA's LoRA depth). No ViT code was released;
the HiDe parts follow thu-ml/HiDe-Prompt (methods/hide_lora.py). The LoRA spec is the method's own
(HiDe's slots, rank 4); `--config.lora.KEY` overrides it.

Checkpoint: the paper used ViT-B/16 iBOT-21K (self-supervised on ImageNet-21K, as HiDe-Prompt). This
config loads whatever `model.path` holds in the `google/vit-base-patch16-224-in21k` layout; that
Hugging Face checkpoint is the supervised ImageNet-21K ViT-B/16, not iBOT, so numbers from it are not
the paper's. An iBOT-21K checkpoint converted to the same layout (safetensors + config.json) runs as is.

Data: a tfds `cifar100` prepared as array_record under `data.data_dir` (see docs/DATA.md: place
cifar-100-binary.tar.gz in <data_dir>/downloads/manual and prepare once with the `tf` extra).
Weights: a `google/vit-base-patch16-224-in21k`-layout checkpoint directory at `model.path`.
"""
import ml_collections

from experiments.configs import default
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict({
        "name": "hf", "path": "", "kind": "vit", "compute_dtype": "bfloat16", "remat": False, "tiny": {},
    })
    # tfds's defaults (data/sources.py): dataset cifar100, splits train / test. The keys set here are ones
    # image_folder shares, so `--config.data.name=image_folder --config.data.data_dir=...` (README) runs
    # your own images under the same protocol: 10 tasks, 224 px.
    config.data = data_sources.config_section("tfds", data_dir="", num_tasks=10, image_size=224, seed=0)
    config.method.name = "treelora"
    config.method.treelora.lam = 0.1
    config.method.treelora.tree_depth = 5  # the paper's tree depth for ViTs (Table 6)
    config.method.treelora.form = "hide"  # the paper's ViT method, on any stream
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 0.005, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "clip_norm": 0.0,
        "schedule": "constant",
    })
    config.train.batch_size = 192
    config.train.epochs = 20
    config.train.train_mask = "task"
    config.eval.batch_size = 256
    return config
