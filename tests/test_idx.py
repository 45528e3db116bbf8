"""The IDX reader: the arrays of files written here byte by byte, and every damaged file refused in one line."""
import gzip

import numpy as np
import pytest

from jaxtree_lora.data import DataError
from jaxtree_lora.data.idx import read_idx, read_images_and_labels

from idx_files import idx_bytes, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_images_and_labels_round_trip_gzip_or_plain(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], np.uint8)
    read_images, read_labels = read_images_and_labels(write_idx(tmp_path / "images", images, compress=compress),
                                                      write_idx(tmp_path / "labels", labels, compress=compress))
    assert read_images.dtype == np.uint8 and read_images.shape == (3, 4, 5) and np.array_equal(read_images, images)
    assert read_labels.dtype == np.int32 and read_labels.tolist() == [7, 0, 9]


def test_the_header_is_read_big_endian_by_hand():
    """A 2x3 int16 array written by hand: magic 00 00 0b 02, sizes 2 and 3, values big-endian."""
    raw = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + b"".join(v.to_bytes(2, "big", signed=True)
                                                                 for v in (1, -2, 300, 4, 5, -600))
    assert raw == idx_bytes(np.array([[1, -2, 300], [4, 5, -600]]), 0x0B), "the test writer agrees with the spec"


def test_wider_types_come_back_in_native_order(tmp_path):
    values = np.array([[1.5, -2.25], [3e9, 0.0]])
    path = write_idx(tmp_path / "floats", values, 0x0E)
    read = read_idx(path)
    assert read.dtype == np.float64 and read.dtype.isnative and np.array_equal(read, values)


def damaged(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


GOOD = idx_bytes(np.zeros((2, 3, 3), np.uint8))
BAD_FILES = [
    ("not_idx", b"PK\x03\x04 a zip file", "not an IDX file"),
    ("empty", b"", "not an IDX file"),
    ("type", bytes([0, 0, 0x07, 3]) + GOOD[4:], "not an IDX file"),
    ("header", GOOD[:9], "truncated inside its IDX header"),
    ("short", GOOD[:-1], "truncated or damaged"),
    ("long", GOOD + b"\x00", "truncated or damaged"),
    ("gzip", gzip.compress(GOOD)[:-6], "damaged gzip"),
]


@pytest.mark.parametrize("name,data,expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_damaged_file_is_refused_in_one_line(tmp_path, name, data, expected):
    with pytest.raises(DataError, match=expected) as error:
        read_idx(damaged(tmp_path, name, data))
    assert "\n" not in str(error.value) and name in str(error.value), "one line naming the file"


def test_mismatched_pairs_are_refused(tmp_path):
    images = write_idx(tmp_path / "images", np.zeros((3, 4, 4), np.uint8))
    labels = write_idx(tmp_path / "labels", np.zeros((2,), np.uint8))
    with pytest.raises(DataError, match="3 images but labels has 2 labels"):
        read_images_and_labels(images, labels)
    with pytest.raises(DataError, match="not images"):
        read_images_and_labels(labels, labels)
    with pytest.raises(DataError, match="not labels"):
        read_images_and_labels(images, images)
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_images_and_labels(str(tmp_path / "absent"), labels)
