"""The IDX format of MNIST and Fashion-MNIST, read with numpy (gzip-compressed or plain).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 size per dimension, then the values in row-major order, big-endian. Images are
[N, rows, columns] uint8 (type 0x08, 3 dimensions), labels [N] uint8 (1 dimension). Anything else (a
wrong magic, a size the data does not fill exactly, images and labels of different counts) is a
DataError naming the file, so a truncated or mixed-up download never becomes a silent wrong stream.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from jaxtree_lora.data.stream import DataError

# Type code -> numpy dtype (big-endian where it has more than one byte).
TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
         0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _raw(path: str) -> bytes:
    """The file's bytes, decompressed when they start with gzip's magic (whatever the extension)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise DataError(f"cannot read IDX file {path} ({error.strerror or error}): check data.data_dir") from error
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path} is a damaged gzip file ({error}): download it again") from error
    return data


def read_idx(path: str) -> np.ndarray:
    """The array an IDX file holds (native byte order), checked against its header."""
    data = _raw(path)
    name = os.path.basename(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in TYPES or data[3] == 0:
        raise DataError(f"{path} is not an IDX file (magic {data[:4].hex() or 'missing'}; expected 0000 then a type "
                        f"code 08-0e and the number of dimensions): point data.data_dir at MNIST-style IDX files")
    dtype, ndim = TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header ({len(data)} bytes for {ndim} dimensions): "
                        f"download it again")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", ndim, 4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{name} holds {len(data) - header} data bytes but its header {list(shape)} of {dtype.name} "
                        f"needs {expected}: the file is truncated or damaged; download it again")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_images_and_labels(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] uint8, labels [N] int32) from an images file and its labels file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path} holds {images.dtype.name} {list(images.shape)}, not images [N, rows, columns] "
                        f"uint8: is it a labels file? check the file names in data.data_dir")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path} holds {labels.dtype.name} {list(labels.shape)}, not labels [N] of integers: "
                        f"is it an images file? check the file names in data.data_dir")
    if len(images) != len(labels):
        raise DataError(f"{os.path.basename(images_path)} has {len(images)} images but {os.path.basename(labels_path)} "
                        f"has {len(labels)} labels: the two files are not a pair; download them again")
    return images, labels.astype(np.int32)
