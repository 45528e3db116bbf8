"""Writes MNIST-style IDX files for tests, with struct (independently of the reader under test)."""
import gzip
import struct

import numpy as np


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding of `array`: magic 00 00 type ndim, big-endian uint32 sizes, big-endian values."""
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, big_endian).tobytes()


def write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> str:
    data = idx_bytes(array, type_code)
    with open(path, "wb") as file:
        file.write(gzip.compress(data) if compress else data)
    return str(path)


def fashion_like(directory, per_class_train: int = 12, per_class_test: int = 6, classes: int = 10, seed: int = 0,
                 compress: bool = True) -> tuple:
    """A tiny Fashion-MNIST-shaped IDX set in `directory`: 28x28 images whose every pixel is distinct per
    image (the image's index is written into its first pixels), class c a bright square at a class
    position. Returns (train images, train labels, test images, test labels)."""
    rng = np.random.default_rng(seed)
    out = []
    for split, per_class, offset in (("train", per_class_train, 0), ("t10k", per_class_test, 50000)):
        labels = np.tile(np.arange(classes, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
        for index, label in enumerate(labels):
            row, column = divmod(int(label), 5)
            images[index, 4 + 10 * row:12 + 10 * row, 2 + 5 * column:6 + 5 * column] = 200
            images[index, 0, :3] = np.frombuffer(struct.pack(">I", index + offset)[1:], np.uint8)  # unique
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress=compress)
        out += [images, labels]
    return tuple(out)
