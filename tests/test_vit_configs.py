"""The ViT-B/16 benchmark configs (Split CIFAR-100, ImageNet-R 10 and 20 tasks, CUB-200) load with the
papers' settings and train two real steps through the loop on a tiny tfds dataset prepared on disk
here (array_record, no TensorFlow), read through `data_source`, with a tiny ViT in place of ViT-B/16."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from experiments.configs import vit_b16_cifar100, vit_b16_cub200, vit_b16_imagenet_r  # noqa: E402
from jaxtree_lora.data import get_stream, sources  # noqa: E402
from jaxtree_lora.train import backbone as backbone_lib  # noqa: E402
from jaxtree_lora.train.loop import Run, StopRequested  # noqa: E402


class TinyBenchmark(tfds.core.GeneratorBasedBuilder):
    """20 classes of 12x12 RGB images with a class-coloured square (test data only)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(12, 12, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=20)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(80, 0), "test": self._generate_examples(40, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for index in range(count):
            label = index % 20
            image = rng.integers(0, 30, (12, 12, 3)).astype(np.uint8)
            image[2:8, 2:8, label % 3] = 60 + 9 * label
            yield index, {"image": image, "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    TinyBenchmark(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_configs_carry_the_papers_settings():
    cifar = vit_b16_cifar100.get_config()
    data = sources.options(cifar.data)  # what the tfds source reads: the config's keys over its defaults
    assert (data.dataset, data.num_tasks, data.train_split, data.test_split) == ("cifar100", 10, "train", "test")
    assert (cifar.method.treelora.lam, cifar.method.treelora.tree_depth) == (0.1, 5), "TreeLoRA's ViT setting"
    assert (cifar.optimizer.learning_rate, cifar.train.batch_size, cifar.train.epochs) == (0.005, 192, 20)
    assert cifar.method.treelora.form == "hide" and cifar.lora.targets is None, \
        "the paper's ViT method: TreeLoRA in HiDe's decomposition, with HiDe's own slots"
    assert vit_b16_imagenet_r.get_config("10").train.epochs == vit_b16_cub200.get_config().train.epochs == 50
    for tasks in ("10", "20"):
        imr = sources.options(vit_b16_imagenet_r.get_config(tasks).data)
        assert (imr.dataset, imr.num_tasks) == ("imagenet_r", int(tasks))
        assert imr.test_split == "" and imr.test_fraction == 0.2, "ImageNet-R: 80/20 split per class"
    with pytest.raises(ValueError, match="10 or 20"):
        vit_b16_imagenet_r.get_config("7")
    cub = sources.options(vit_b16_cub200.get_config().data)
    assert (cub.dataset, cub.num_tasks, cub.test_split) == ("caltech_birds2011", 10, "test")


@pytest.mark.parametrize("module,arg", [(vit_b16_cifar100, ""), (vit_b16_imagenet_r, "10"),
                                        (vit_b16_imagenet_r, "20"), (vit_b16_cub200, "")])
def test_two_steps_on_a_tiny_dataset(module, arg, data_dir, tmp_path):
    config = module.get_config(arg)
    tasks = config.data.num_tasks
    config.data.dataset = "tiny_benchmark"  # the tiny stand-in prepared above, same reader and protocol
    config.data.data_dir = data_dir
    config.data.image_size = 16
    if config.data.test_split == "":  # ImageNet-R: one split, held out per class
        config.data.train_split = "train"
    config.model.name = "tiny-vit"
    config.model.compute_dtype = "float32"
    config.train.batch_size = 4
    config.eval.batch_size = 8
    backbone = backbone_lib.build(config)
    stream = get_stream(config.data, backbone.tokenizer)
    assert len(stream.tasks) == tasks and stream.num_classes == 20
    records = []
    run = Run(config=config, backbone=backbone, stream=stream, workdir=str(tmp_path / "run"), progress=False,
              logger=records.append, stop_after_steps=2)
    with pytest.raises(StopRequested):
        run.fit()
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps][-1] == 2 and all(np.isfinite(r["loss"]) for r in steps)
