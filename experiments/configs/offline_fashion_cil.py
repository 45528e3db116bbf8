"""Class-incremental images offline: Fashion-MNIST (Debian package, asset "fashion_mnist") on DINOv2 ViT-S/14.

`offline-fashion-cil` (jaxtree_lora/data/fashion.py): 5 tasks of 2 classes, class order seeded, 160
training and 50 test images per class (1,600 / 500), grey 28x28 as 3 channels, stored at 28 px and
resized by the ViT to 112 px (8 x 8 patches of 14 + [CLS] = 65 tokens) inside the jitted forward.
Model "dinov2_small" (DINOv2 ViT-S/14, ~22M parameters); TreeLoRA in HiDe-LoRA's form (`form="auto"`
on a classification stream), HiDe's optimiser (Adam, 0.03 x 16 / 256), 2 epochs of batch 16.

Why these sizes: one method in at most ~10 minutes on 2 CPU cores. A ViT-S forward at 65 tokens is
2.8 GFLOP per image. Measured here on a ViT-S/14-shaped ViT (random weights): 100 images at 112 px
take 3.7 CPU-seconds (73 GFLOP per CPU-second); a training pass (forward, then the backward down to
block 0, the first adapted one) costs 3.0 forwards. The run's image forwards: training 2 epochs x
1,600 x 3 = 9.6k; per task the pre-trained features and the class statistics under the slot (which the
NCM prototypes reuse), 2 x 1,600 = 3.2k; evaluation after each task, 15 task-evaluations x 100 images x 2 passes
(pre-trained features for the task identity, then the slot's) = 3k; the final recomputed prototypes
2.6k. 18.4k forwards = 52 TFLOP: 8.6 minutes at 100 GFLOP/s, 5.9 at the measured rate with both cores
busy, plus ~30 CPU-seconds of compilation and host work (a proxy run of that ViT, 40 / 10 per class,
1 epoch, 6.8k forwards counting evaluation padded to batches of 100, took 278 CPU-seconds). 200
images per class would take 10 minutes at 100 GFLOP/s; 224 px (257 tokens) over 4x as long.
Resizing 28 -> 112 px in the forward costs nothing measurable (3.68 vs 3.78 CPU-seconds per 100
images fed at 28 or at 112 px) and keeps the host copy 16x smaller (2.4 KB an image).

`get_config("quick")`, the README's main job: 84 px (37 tokens), 128 training images per class, no
recomputed-prototype diagnostic. TreeLoRA 79.3 +- 0.3 against the frozen model's 60.4 +- 1.2 (seeds 0-2,
RESULTS.md). Alone on 2 cores: 1:52 wall on a first run (`JAXTREE_LORA_XLA_CACHE=off`, 13.3 s of it
compiling), 1:37-1:46 with the compilation cache filled (BENCHMARKS.md, issue 25).

`get_config("tiny")`: a random 2-layer ViT at 42 px (patch 14), 8 / 4 images per class, 1 epoch. Measured
(2 shared cores, XLA compile cache warm): the whole run 10.4 s; one epoch (2 steps of 8) 6-20 ms after
the first task, whose 1.7 s is compilation.

    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py
    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py:quick   # the README's main job
    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py --config.data.data_dir=/my/mnist
    jaxtree-lora run --config experiments/configs/offline_fashion_cil.py:tiny   # tiny random ViT, tests
"""
import ml_collections

from experiments.configs import default
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict({
        "name": "dinov2_small", "path": "", "kind": "vit", "compute_dtype": "float32", "remat": False, "tiny": {},
    })
    # offline-fashion-cil's defaults (data/sources.py): 5 tasks, 160 / 50 images per class, seed 0.
    # The backbone's input size, a multiple of the patch (14): 112 px = 8 x 8 patches + [CLS] = 65 tokens.
    config.data = data_sources.config_section("offline-fashion-cil", image_size=112)
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
    elif arg == "quick":  # the README's main job: 84 px (6 x 6 patches + [CLS] = 37 tokens), 128 images a class
        config.data.image_size = 84
        config.data.per_class_train = 128
        config.eval.recomputed_prototypes = False  # a diagnostic pass over every class's training data
    elif arg:
        raise ValueError(f"offline_fashion_cil takes '', 'quick' or 'tiny', got {arg!r}")
    return config
