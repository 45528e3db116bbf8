"""Class-incremental images offline: Fashion-MNIST (Debian package, asset "fashion_mnist") on DINOv2 ViT-S/14.

`offline-fashion-cil` (jaxtree_lora/data/fashion.py): 5 tasks of 2 classes, class order seeded,
PLACEHOLDER

    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py
    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py --config.data.data_dir=/my/mnist
    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py:tiny   # tiny random ViT, tests
"""
import ml_collections

from experiments.configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict({
        "name": "dinov2_small", "path": "", "kind": "vit", "compute_dtype": "float32", "remat": False, "tiny": {},
    })
    config.data = ml_collections.ConfigDict({
        "name": "offline-fashion-cil", "data_dir": "", "num_tasks": 5, "classes_per_task": 0,
        "per_class_train": 200, "per_class_test": 50, "seed": 0,
        # The backbone's input size, a multiple of the patch (14): 112 px = 8 x 8 patches + [CLS] = 65 tokens.
        "image_size": 112,
    })
    config.method.name = "treelora"  # form "auto": HiDe-LoRA's decomposition on this classification stream
    config.train.epochs = 2
    config.train.batch_size = 16
    config.eval.batch_size = 100
    if arg == "tiny":  # a random 2-layer ViT, patch 14 at 42 px (28 px upsampled in the forward, as the real run)
        config.model.name = "tiny-vit"
        config.model.tiny = {"image_size": 42, "patch_size": 14}
        config.data.image_size = 42
        config.data.per_class_train = 8
        config.data.per_class_test = 4
        config.train.epochs = 1
        config.train.batch_size = 8
        config.eval.batch_size = 16
        config.method.hide_lora.tap_epochs = 2
        config.method.hide_lora.tii_epochs = 2
    elif arg:
        raise ValueError(f"offline_fashion_cil takes '' or 'tiny', got {arg!r}")
    return config
