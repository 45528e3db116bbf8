"""offline-fashion-cil: class-incremental Fashion-MNIST from IDX files (a tiny IDX set written here; the
real asset only in the `assets`-marked test), its config, the planner's view of it, and a whole
`jaxtree-lora run` of the tiny config."""
import json

import numpy as np
import pytest

from experiments.configs import offline_fashion_cil
from jaxtree_lora import cli
from jaxtree_lora.data import DataError, get_stream
from jaxtree_lora.data.fashion import FASHION_CLASSES, offline_fashion_cil as build

from idx_files import fashion_like, write_idx


@pytest.fixture
def idx_dir(tmp_path):
    directory = tmp_path / "idx"
    directory.mkdir()
    sources = fashion_like(directory, per_class_train=12, per_class_test=6)
    return directory, sources


def grey(split) -> np.ndarray:
    return split.inputs["images"][..., 0]


def test_five_tasks_of_two_classes_with_seeded_order_and_exact_counts(idx_dir):
    directory, _ = idx_dir
    stream = build(str(directory), per_class_train=8, per_class_test=4, seed=3)
    assert stream.name == "offline-fashion-cil" and stream.kind == "classification" and len(stream) == 5
    assert stream.class_names == FASHION_CLASSES and stream.num_classes == 10
    assert list(stream.class_order) == list(np.random.RandomState(3).permutation(10)), "class order seeded as PyCIL's"
    for task in stream.tasks:
        assert len(task.classes) == 2 and task.name == "+".join(FASHION_CLASSES[c] for c in task.classes)
        for split, per_class in ((task.train, 8), (task.test, 4)):
            images = split.inputs["images"]
            assert images.shape == (2 * per_class, 28, 28, 3) and images.dtype == np.uint8, "stored at 28x28 uint8"
            assert (images == images[..., :1]).all(), "grey replicated to 3 channels"
            assert sorted(np.bincount(split.labels, minlength=10)[list(task.classes)]) == [per_class] * 2


def test_every_image_is_a_file_image_of_its_own_label(idx_dir):
    """Each stream image is found in its split's file (by the index written into its first pixels), and
    its label is that file row's label: no image and label are paired wrongly."""
    directory, (train_images, train_labels, test_images, test_labels) = idx_dir
    stream = build(str(directory), per_class_train=8, per_class_test=4)
    for task in stream.tasks:
        for split, images, labels, offset in ((task.train, train_images, train_labels, 0),
                                              (task.test, test_images, test_labels, 50000)):
            for image, label in zip(grey(split), split.labels):
                row = int.from_bytes(bytes([0, *image[0, :3]]), "big") - offset
                assert np.array_equal(images[row], image) and labels[row] == label


def test_the_same_seed_gives_the_same_stream_and_another_seed_another(idx_dir):
    directory, _ = idx_dir
    first, again, other = (build(str(directory), per_class_train=8, per_class_test=4, seed=s) for s in (0, 0, 1))
    for a, b in zip(first.tasks, again.tasks):
        assert np.array_equal(a.train.inputs["images"], b.train.inputs["images"])
        assert np.array_equal(a.test.labels, b.test.labels)
    assert first.class_order != other.class_order
    def picked(stream, label):
        return {image.tobytes() for task in stream.tasks for image in grey(task.train)[task.train.labels == label]}
    assert picked(first, 0) != picked(other, 0), "the seed also draws other images of a class (8 of 12)"


def test_no_image_is_used_twice_and_duplicates_across_files_stay_in_training(idx_dir):
    directory, (train_images, train_labels, test_images, test_labels) = idx_dir
    # A test image that copies a training image of the same class (class 3, "dress").
    row = int(np.flatnonzero(test_labels == 3)[0])
    test_images = test_images.copy()
    test_images[row] = train_images[np.flatnonzero(train_labels == 3)[0]]
    write_idx(directory / "t10k-images-idx3-ubyte.gz", test_images)
    with pytest.raises(DataError, match="class dress has 5 distinct test images .* lower data.per_class_test"):
        build(str(directory), per_class_train=12, per_class_test=6)
    stream = build(str(directory), per_class_train=12, per_class_test=5)
    seen = [image.tobytes() for task in stream.tasks for split in (task.train, task.test) for image in grey(split)]
    assert len(seen) == len(set(seen)) == 10 * (12 + 5), "no image twice: not across train/test, not across tasks"


def brute_force_first_occurrences(*image_sets):
    """The masks by a Python set of each image's bytes, in order: the definition, independently."""
    seen, masks = set(), []
    for images in image_sets:
        mask = []
        for image in images:
            key = (image.dtype.str, np.ascontiguousarray(image).tobytes())
            mask.append(key not in seen)
            seen.add(key)
        masks.append(np.array(mask, bool))
    return masks


@pytest.mark.parametrize("shape,dtype", [((28, 28), np.uint8), ((5, 3), np.uint8), ((4, 4), np.float32)])
@pytest.mark.parametrize("collide", [False, True])
def test_first_occurrences_are_exact_with_repeats_within_and_across_sets(shape, dtype, collide, monkeypatch):
    """Repeats planted within the first set, across sets and within the second; row widths that are and
    are not a multiple of 8 bytes, and float pixels. With every hash key made equal (`collide`), the
    byte-for-byte check must catch the false repeats and fall back: a wrong mask either way means
    distinct images dropped (or repeats kept) from the stream."""
    from jaxtree_lora.data import fashion

    if collide:
        monkeypatch.setattr(fashion, "_row_keys", lambda flat: np.zeros(len(flat), np.uint64))
    rng = np.random.default_rng(3)
    first = (rng.integers(0, 4, (40,) + shape)).astype(dtype)
    second = (rng.integers(0, 4, (30,) + shape)).astype(dtype)
    first[7], first[19] = first[2], first[2]
    second[0], second[5], second[6] = first[11], second[3], first[39]
    masks = fashion.first_occurrences(first, second)
    expected = brute_force_first_occurrences(first, second)
    for got, want in zip(masks, expected):
        np.testing.assert_array_equal(got, want)
    assert (~np.concatenate(expected)).sum() == 5, "the planted repeats are not all there: vacuous"


def test_a_subset_of_classes_and_bad_options_are_refused_in_one_line(idx_dir, tmp_path):
    directory, _ = idx_dir
    stream = build(str(directory), num_tasks=1, per_class_train=2, per_class_test=2, classes=("bag", "sneaker"))
    assert stream.class_names == ("bag", "sneaker") and len(stream) == 1
    assert set(stream.tasks[0].train.labels) == {0, 1}, "class ids are positions in data.classes"
    cases = [(dict(classes=("bag", "hat")), "unknown Fashion-MNIST class"), (dict(classes=("bag", "bag")), "twice"),
             (dict(per_class_train=13), "fewer than data.per_class_train=13"),
             (dict(per_class_test=0), "must be >= 1"), (dict(data_dir=str(tmp_path / "none")), "not a directory"),
             (dict(data_dir=str(tmp_path)), "has no train-images-idx3-ubyte.gz")]
    for options, expected in cases:
        with pytest.raises(DataError, match=expected) as error:
            build(**{"data_dir": str(directory), "num_tasks": 1, **options})
        assert "\n" not in str(error.value)


def test_plain_idx_files_and_the_data_config_route(tmp_path):
    fashion_like(tmp_path, per_class_train=3, per_class_test=2, compress=False)
    stream = get_stream({"name": "offline-fashion-cil", "data_dir": str(tmp_path), "per_class_train": 3,
                         "per_class_test": 2, "classes_per_task": 5, "seed": 1})
    assert len(stream) == 2 and len(stream.tasks[0].train) == 15 and stream.metadata["image_size"] == 28


def test_config_and_planner_shapes():
    from jaxtree_lora.train.memory import stream_shape

    config = offline_fashion_cil.get_config()
    assert (config.model.name, config.model.kind, config.data.name) == ("dinov2_small", "vit", "offline-fashion-cil")
    assert config.data.image_size % 14 == 0, "ViT-S/14 needs a multiple of its patch"
    assert config.method.name == "treelora" and config.method.treelora.form in (None, "auto"), "HiDe form on this stream"
    assert stream_shape(config.data) == ("classification", 5, 10, 0)
    config.data.classes_per_task = 3
    assert stream_shape(config.data) == ("classification", 4, 10, 0)
    tiny = offline_fashion_cil.get_config("tiny")
    assert tiny.model.name == "tiny-vit" and tiny.data.image_size == tiny.model.tiny["image_size"]
    quick = offline_fashion_cil.get_config("quick")
    assert (quick.model.name, quick.method.name) == ("dinov2_small", "treelora"), "the main job: real ViT, TreeLoRA"
    assert quick.data.image_size % 14 == 0 and quick.data.image_size < config.data.image_size
    with pytest.raises(ValueError, match="'tiny'"):
        offline_fashion_cil.get_config("huge")


def test_tiny_config_trains_two_steps_through_the_loop(tmp_path):
    """The default suite's check of the path IDX files -> stream -> ViT forward (28 px resized to 42) ->
    train step, with SeqLoRA (TreeLoRA's HiDe form adds ~10 s of eager initialisation on a shared CPU);
    the config's own method over all five tasks is the slow test below."""
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run, StopRequested

    fashion_like(tmp_path, per_class_train=8, per_class_test=4)
    config = offline_fashion_cil.get_config("tiny")
    config.data.data_dir = str(tmp_path)
    config.method.name = "seqlora"
    backbone = backbone_lib.build(config)
    stream = get_stream(config.data, backbone.tokenizer)
    records = []
    run = Run(config=config, backbone=backbone, stream=stream, workdir=str(tmp_path / "run"), progress=False,
              logger=records.append, stop_after_steps=2)
    with pytest.raises(StopRequested):
        run.fit()
    steps = [record for record in records if record["type"] == "step"]
    assert steps[-1]["step"] == 2 and all(np.isfinite(record["loss"]) for record in steps)


@pytest.mark.slow  # ~10 s alone, ~25 s on a shared 2-core CPU: five tasks, HiDe's host-side heads compiled
def test_tiny_config_runs_the_stream_end_to_end(tmp_path, capsys):
    (tmp_path / "idx").mkdir()
    fashion_like(tmp_path / "idx", per_class_train=8, per_class_test=4)
    status = cli.main(["run", "--config", "experiments/configs/offline_fashion_cil.py:tiny", "--workdir",
                       str(tmp_path / "run"), "--no-progress", f"--config.data.data_dir={tmp_path / 'idx'}"])
    out = capsys.readouterr()
    assert status == 0, out.err[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stream"] == "offline-fashion-cil" and len(results["tasks"]) == 5
    matrix = np.asarray(results["accuracy_matrix"], float)
    assert matrix.shape == (5, 5) and np.isfinite(np.diag(matrix)).all(), "every task trained and scored"


def test_a_damaged_idx_file_stops_the_run_in_one_line_before_the_workdir_exists(tmp_path, capsys):
    fashion_like(tmp_path, per_class_train=2, per_class_test=2)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    status = cli.main(["run", "--config", "experiments/configs/offline_fashion_cil.py:tiny", "--workdir",
                       str(tmp_path / "run"), "--no-progress", f"--config.data.data_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "damaged gzip" in err and "train-images-idx3-ubyte.gz" in err
    assert "\n" not in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.assets
def test_real_fashion_mnist_when_installed():
    from jaxtree_lora import assets

    try:
        directory = assets.path("fashion_mnist")
    except assets.AssetMissing:
        pytest.skip("fashion_mnist not installed (run `jaxtree-lora assets fashion_mnist`)")
    from jaxtree_lora.data.fashion import read_split

    train_images, train_labels = read_split(str(directory), "train")
    test_images, test_labels = read_split(str(directory), "test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10 and np.bincount(test_labels).tolist() == [1000] * 10
    stream = build(per_class_train=5, per_class_test=5)
    assert len(stream) == 5 and stream.tasks[0].train.inputs["images"].shape == (10, 28, 28, 3)
