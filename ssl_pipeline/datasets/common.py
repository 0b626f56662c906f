"""What every format's reader returns, and the error it raises."""
from dataclasses import dataclass

import numpy as np


class DatasetFormatError(ValueError):
    """The data do not have the declared format; the message names the file (and archive member)."""


@dataclass
class RawDataset:
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,), classes 0..K-1
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list = None  # from the data (folder names, a names file), else None
    sources: dict = None  # what each split was read from, for error messages: split -> text


def records(data: bytes, record_bytes: int, source: str) -> np.ndarray:
    """Fixed-size binary records (CIFAR, STL-10) as a uint8 (N, record_bytes) array."""
    if len(data) == 0 or len(data) % record_bytes:
        raise DatasetFormatError(f"{source} is {len(data):,} bytes, not a whole number of {record_bytes:,}-byte "
                                 "records: the file is truncated or not in this format")
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, record_bytes)


def name_lines(data: bytes) -> list:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


@dataclass
class DatasetIndex:
    """What a format can tell about its images without decoding them: enough to plan the validation split
    and the shards of sharded preprocessing (ssl_pipeline/stages/preprocess.py), whose jobs then decode
    only their own images with the format's decode(paths, options, split, positions)."""
    train_labels: np.ndarray  # int64 (N,), classes 0..K-1, in the order decode numbers the train images
    test_labels: np.ndarray  # int64 (M,)
    class_names: list = None
    sources: dict = None  # as RawDataset.sources
