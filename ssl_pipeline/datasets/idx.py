"""The MNIST family's IDX files (dataset.format: idx): four files, images and labels per split.

Layout: a big-endian header `0x00 0x00 <dtype code> <ndims>`, one uint32 per dimension, then the raw
values in C order. We accept only unsigned bytes (dtype code 0x08), which is what image and label
files use.
"""
import gzip
from pathlib import Path

import numpy as np

from ssl_pipeline.datasets.common import DatasetFormatError, RawDataset

UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(DatasetFormatError):
    """A file is not a well-formed IDX file; the message names the file and the problem."""


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a uint8 array of the shape the header declares."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: {len(data)} bytes is too short for an IDX header (need 4)")
    zero1, zero2, dtype_code, ndims = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0:
        raise IdxFormatError(
            f"{source}: bad magic number 0x{data[:4].hex()} (IDX files start with two zero bytes)"
        )
    if dtype_code != UNSIGNED_BYTE:
        raise IdxFormatError(
            f"{source}: element type 0x{dtype_code:02x} is not supported (expected 0x08, unsigned byte)"
        )
    if ndims == 0:
        raise IdxFormatError(f"{source}: header declares 0 dimensions")
    header_size = 4 + 4 * ndims
    if len(data) < header_size:
        raise IdxFormatError(
            f"{source}: truncated header: {ndims} dimensions need {header_size} bytes, file has {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndims, offset=4))
    if any(d == 0 for d in shape):
        raise IdxFormatError(f"{source}: header declares an empty dimension, shape {shape}")
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        problem = "truncated" if len(data) < expected_size else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: {problem}: shape {shape} needs {expected_size} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, plain or gzip-compressed (as mirrors serve them)."""
    data = Path(path).read_bytes()
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return parse_idx(data, source=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """The inverse of parse_idx, for building test datasets."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UNSIGNED_BYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


ROLES = ("train_images", "train_labels", "test_images", "test_labels")


def as_nchw(images: np.ndarray, source) -> np.ndarray:
    """IDX images are (N, H, W) or (N, H, W, C); we store (N, C, H, W)."""
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise IdxFormatError(
        f"{source}: an image file must have 3 dimensions (N, H, W) or 4 (N, H, W, C with C 1 or 3), "
        f"got shape {images.shape}"
    )


def load_split(images_path, labels_path):
    images = as_nchw(read_idx(images_path), images_path)
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise IdxFormatError(f"{labels_path}: a label file must have 1 dimension, got shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return images, labels


def read(paths: dict, options: dict) -> RawDataset:
    train_images, train_labels = load_split(paths["train_images"], paths["train_labels"])
    test_images, test_labels = load_split(paths["test_images"], paths["test_labels"])
    return RawDataset(train_images, train_labels, test_images, test_labels,
                      sources={"train": str(paths["train_labels"]), "test": str(paths["test_labels"]),
                               "train_images": str(paths["train_images"]), "test_images": str(paths["test_images"])})


def read_unlabeled(paths: dict, options: dict) -> np.ndarray:
    return as_nchw(read_idx(paths["images"]), paths["images"])
