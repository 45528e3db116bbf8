"""Split ImageNet-R with ViT-B/16: 200 classes in 10 tasks (default) or 20 tasks (`:20`).

    jaxtree-lora run --config experiments/configs/vit_b16_imagenet_r.py:20 \
        --config.model.path=/path/to/vit-base-patch16-224-in21k --config.data.data_dir=/path/to/tfds

Protocol of the LoRA continual-learning papers (docs/METHODS.md, vision protocol; InfLoRA, SD-LoRA, CL-LoRA,
LoDA): ImageNet-R has no official train/test split, so 80% of each class trains and 20% tests
(seeded); classes in a seeded order, 200 / T per task; 224x224 inputs; task-identity-free evaluation
over every class seen so far. tfds `imagenet_r` ships one split ("test", 30,000 images), read here
through `data_source` from `data.data_dir` (prepared once with the `tf` extra).

Method settings follow the TreeLoRA ViT setting (TreeLoRA in HiDe-LoRA's decomposition, HiDe's
slots at rank 5 as its ImageNet-R script, lambda 0.1, Adam lr 0.005, batch 192, 50 epochs on
ImageNet-R, tree depth 5; the checkpoint note of vit_b16_cifar100.py applies); each other method keeps its own options under config.method.<name>; the papers' own
optimisers for this benchmark are listed in docs/METHODS.md (e.g. SD-LoRA SGD 1e-2, InfLoRA Adam
5e-4 for 50 epochs, LoDA SGD 0.02 with r 64 and rho 0.7).
"""
import ml_collections

from experiments.configs import vit_b16_cifar100
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    tasks = int(arg or 10)
    if tasks not in (10, 20):
        raise ValueError(f"vit_b16_imagenet_r takes 10 or 20 tasks, got {arg!r}: use the config file as FILE.py:10 or :20")
    config = vit_b16_cifar100.get_config()
    config.data = data_sources.config_section(
        "tfds", dataset="imagenet_r", data_dir="", num_tasks=tasks, image_size=224, seed=0, train_split="test",
        test_split="", test_fraction=0.2)
    config.train.epochs = 50  # the paper's ImageNet-R setting (Table 6)
    config.lora.rank = 5  # HiDe-LoRA's ImageNet-R script (`--lora_rank 5`)
    return config
