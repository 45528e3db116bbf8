"""Class-incremental image streams read from PREPARED tfds datasets through `tfds.data_source`.

`tfds.data_source` reads array_record files by random access, with no TensorFlow at read time. The
dataset must be prepared once in array_record format (cifar100, imagenet_r, caltech_birds2011, ...)
on a machine with the `tf` extra, or copied as a prepared `<data_dir>/<name>/<version>/` folder; the
steps are in docs/DATA.md. Images come out uint8 [N, S, S, 3] at `image_size` by default (a quarter
of float32's host memory; the ViT scales them inside the jitted step). A dataset with one labelled
split takes `test_split=""`: a seeded per-class `test_fraction` of the train split is held out.
"""
from __future__ import annotations

import os

import numpy as np

from jaxtree_lora.data.stream import DataError, Split, Stream, class_incremental


def decode_image(image, size: int) -> np.ndarray:
    """uint8 [size, size, 3] from a decoded tfds image (grey, RGB or RGBA, any size)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise DataError(f"expected an image [H, W, C], got shape {image.shape}: check data.image_key")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if size and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image


def read(name: str, data_dir: str, split: str, image_size: int, image_key: str = "image",
         label_key: str = "label", limit: int = 0):
    """(images [N, S, S, 3] uint8, labels [N] int32, class names) of one prepared split."""
    import tensorflow_datasets as tfds

    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"tfds data_dir {data_dir!r} does not exist: prepare {name} there in array_record format "
                        f"(archives in <data_dir>/downloads/manual/, then download_and_prepare("
                        f"file_format='array_record') with the tf extra) and set --config.data.data_dir")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        source = tfds.data_source(name, data_dir=data_dir, split=split)
    except Exception as error:  # tfds raises many types here; all mean "not prepared as array_record"
        raise DataError(f"cannot read tfds dataset {name!r} split {split!r} from {data_dir} ({error}): prepare it "
                        f"with download_and_prepare(file_format='array_record')") from error
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise DataError(f"{name} has no feature {key!r} (it has {', '.join(features.keys())}): "
                            f"set data.image_key / data.label_key")
    if int(limit) < 0:
        raise DataError(f"data.limit must be >= 0 (0: every example), got {limit}")
    count = len(source) if not limit else min(int(limit), len(source))
    if count == 0:
        raise DataError(f"{name} split {split!r} is empty: check data.train_split / data.test_split")
    images, labels = [], []
    for index in range(count):
        example = source[index]
        images.append(decode_image(example[image_key], image_size))
        labels.append(int(example[label_key]))
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(f"{name} images have different sizes {sorted(shapes)[:3]}...: set data.image_size > 0")
    label_feature = features[label_key]
    if hasattr(label_feature, "names") and label_feature.names:
        class_names = tuple(label_feature.names)
    else:
        class_names = tuple(str(i) for i in range(max(labels) + 1))
    return np.stack(images), np.asarray(labels, np.int32), class_names


def holdout(labels: np.ndarray, fraction: float, seed: int, names=None, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded `fraction` of every class held out, at least one example and
    never all of them. A class with a single example cannot give both and is refused (`names[label]`
    names it, `where` says where the data is)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.test_fraction={fraction} must lie strictly between 0 and 1")
    generator = np.random.default_rng([int(seed), 0x7E57])
    train_rows, test_rows = [], []
    for label in np.unique(labels):
        rows = generator.permutation(np.flatnonzero(labels == label))
        if len(rows) < 2:
            name = names[int(label)] if names is not None and 0 <= label < len(names) else int(label)
            raise DataError(f"class {name!r} has 1 example{where}: holding out data.test_fraction needs at least 2 "
                            f"per class (one to train on, one to test): add examples, or give a test split")
        held = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1)
        test_rows.append(rows[:held])
        train_rows.append(rows[held:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def image_splits(train_images: np.ndarray, train_labels: np.ndarray, test: tuple | None, test_fraction: float,
                 seed: int, image_dtype: str, names=None,
                 where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of an image source: `test` (images,
    labels) when the source has a test split, else a seeded `test_fraction` of every class held out
    (`holdout`); uint8 images stay uint8, "float32" scales them to [0, 1]."""
    if test is not None:
        test_images, test_labels = test
    else:
        train_rows, test_rows = holdout(train_labels, test_fraction, seed, names, where)
        test_images, test_labels = train_images[test_rows], train_labels[test_rows]
        train_images, train_labels = train_images[train_rows], train_labels[train_rows]
    if image_dtype == "float32":
        train_images = train_images.astype(np.float32) / 255.0
        test_images = test_images.astype(np.float32) / 255.0
    return train_images, train_labels, test_images, test_labels


def tfds_stream(dataset: str, data_dir: str, num_tasks: int = 10, seed: int = 0, image_size: int = 224,
                train_split: str = "train", test_split: str = "test", limit: int = 0,
                shuffle_classes: bool = True, image_dtype: str = "uint8", image_key: str = "image",
                label_key: str = "label", test_fraction: float = 0.2, classes_per_task: int = 0) -> Stream:
    """A class-incremental image Stream from a prepared tfds dataset (seeded class order).

    `limit` > 0 reads only the first `limit` examples of each split (smoke runs).
    """
    if image_dtype not in ("uint8", "float32"):
        raise DataError(f"data.image_dtype {image_dtype!r} must be 'uint8' or 'float32'")
    train_images, train_labels, names = read(dataset, data_dir, train_split, image_size, image_key, label_key, limit)
    test = read(dataset, data_dir, test_split, image_size, image_key, label_key, limit)[:2] if test_split else None
    train_images, train_labels, test_images, test_labels = image_splits(
        train_images, train_labels, test, test_fraction, seed, image_dtype, names, f" in {dataset} {train_split}")
    for labels in (train_labels, test_labels):
        if int(labels.max()) >= len(names) or int(labels.min()) < 0:
            raise DataError(f"{dataset}: labels outside [0, {len(names)}) for its {len(names)} class names")
    return class_incremental(
        dataset, Split(inputs={"images": train_images}, labels=train_labels),
        Split(inputs={"images": test_images}, labels=test_labels), names, num_tasks, seed, shuffle_classes,
        metadata={"data_dir": data_dir, "image_size": image_size, "train_split": train_split,
                  "test_split": test_split or f"{train_split} (held out {test_fraction:.0%})"},
        classes_per_task=classes_per_task)
