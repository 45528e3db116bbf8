"""Split CUB-200-2011 with ViT-B/16: 200 bird classes in 10 tasks of 20.

    jaxtree-lora run --config experiments/configs/vit_b16_cub200.py \
        --config.model.path=/path/to/vit-base-patch16-224-in21k --config.data.data_dir=/path/to/tfds

The benchmark of LoDA (`exps/dlora/cub10.json`: 20 classes per task, 10 tasks, SGD 0.005, r 32) and
of the PILOT-family papers (docs/METHODS.md, vision protocol): tfds `caltech_birds2011` train/test
splits read through `data_source` from `data.data_dir`; 224x224 inputs; seeded class order;
evaluation over every class seen so far. Method settings as in `vit_b16_cifar100.py` (TreeLoRA in
HiDe-LoRA's decomposition, its checkpoint note included), with the paper's 50 epochs on CUB; other
methods keep their options under config.method.<name>.
"""
import ml_collections

from experiments.configs import vit_b16_cifar100
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = vit_b16_cifar100.get_config()
    config.data = data_sources.config_section(
        "tfds", dataset="caltech_birds2011", data_dir="", num_tasks=10, image_size=224, seed=0,
        train_split="train", test_split="test")
    config.train.epochs = 50  # the paper's CUB setting (Table 6)
    return config
