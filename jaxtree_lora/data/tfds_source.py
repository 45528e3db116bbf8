"""Class-incremental image streams read from PREPARED tfds datasets through `tfds.data_source`.

`tfds.data_source` reads array_record files by random access with no TensorFlow at read time. The
datasets must be prepared once (cifar100, imagenet_r, caltech_birds2011, ...): place the original
archives in `<data_dir>/downloads/manual/` and run `download_and_prepare(file_format='array_record')`
on a machine with the `tf` extra (reference/offline.md §5), or copy a prepared `<data_dir>/<name>/`.

Images are kept as uint8 [N, S, S, C] at `image_size` (resized on load when needed); the backbone
scales and normalises them inside the jitted step.
"""
from __future__ import annotations

import os

import numpy as np

from jaxtree_lora.data.stream import DataError, Split, class_incremental


def _decode(image, size: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if size and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.BILINEAR))
    return image.astype(np.uint8)


def read(name: str, data_dir: str, split: str, image_size: int, image_key: str = "image", label_key: str = "label",
         limit: int = 0):
    import tensorflow_datasets as tfds

    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"tfds data_dir {data_dir!r} does not exist: prepare {name} as array_record there "
                        f"(archives in <data_dir>/downloads/manual/, then download_and_prepare) and set "
                        f"--config.data.data_dir")
    try:
        source = tfds.data_source(name, data_dir=data_dir, split=split)
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:
        raise DataError(f"cannot read tfds dataset {name!r} split {split!r} from {data_dir}: {error}. Prepare it "
                        f"with file_format='array_record'") from error
    count = len(source) if not limit else min(limit, len(source))
    images, labels = [], []
    for index in range(count):
        example = source[index]
        images.append(_decode(example[image_key], image_size))
        labels.append(int(example[label_key]))
    feature = builder.info.features[label_key]
    class_names = tuple(feature.names) if hasattr(feature, "names") else tuple(str(i) for i in range(max(labels) + 1))
    return np.stack(images), np.asarray(labels, np.int32), class_names


def tfds_stream(dataset: str, data_dir: str, num_tasks: int = 10, seed: int = 0, image_size: int = 224,
                train_split: str = "train", test_split: str = "test", limit: int = 0, shuffle_classes: bool = True):
    train_images, train_labels, names = read(dataset, data_dir, train_split, image_size, limit=limit)
    test_images, test_labels, _ = read(dataset, data_dir, test_split, image_size, limit=limit)
    if int(train_labels.max()) >= len(names) or int(test_labels.min()) < 0:
        raise DataError(f"{dataset}: labels out of range for {len(names)} classes")
    return class_incremental(
        dataset, Split(inputs={"images": train_images}, labels=train_labels),
        Split(inputs={"images": test_images}, labels=test_labels), names, num_tasks, seed, shuffle_classes,
        metadata={"data_dir": data_dir, "image_size": image_size})
