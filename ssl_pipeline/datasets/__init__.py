"""Dataset formats, chosen by config dataset.format. A format's reader turns the downloaded files (a
role -> path map, the roles of config dataset.files) into a RawDataset: uint8 (N, C, H, W) images and
int64 labels per split, and the class names the data carry. Preprocessing then writes the same arrays,
card and normalisation whatever the format. To add a format: write its module with a
read(paths, options) -> RawDataset (and read_unlabeled, if it has unlabeled images), add it to FORMATS,
and describe its files in config/config.yaml and the schema.

Sharded preprocessing (config preprocess.shard_images) plans on the labels alone and then decodes each
shard's images in a job of its own. A format for data too large to decode in one job gives the cheap pair
index(paths, options) -> DatasetIndex (no image decoded) and decode(paths, options, split, positions) ->
uint8 (n, C, H, W) for sorted positions of split "train" or "test"; for unlabeled images,
count_unlabeled(paths, options) and decode_unlabeled(paths, options, positions). A format without them
falls back on read(), which decodes the whole dataset in every job: fine for the small formats.
"""
import numpy as np

from ssl_pipeline.datasets import cifar_binary, idx, image_folder, imagenet, stl10_binary
from ssl_pipeline.datasets.common import DatasetFormatError, DatasetIndex, RawDataset

FORMATS = {"idx": idx, "image_folder": image_folder, "cifar_binary": cifar_binary, "stl10_binary": stl10_binary,
           "imagenet": imagenet}


def format_module(name: str):
    if name not in FORMATS:
        raise DatasetFormatError(f"config key dataset.format is {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_options(dataset: dict) -> dict:
    """The options section of config dataset that its format reads ({} for formats without one)."""
    return dataset.get(dataset["format"]) or {} if dataset["format"] in ("image_folder", "cifar_binary", "imagenet") else {}


def read_dataset(format_name: str, paths: dict, options: dict) -> RawDataset:
    return format_module(format_name).read(paths, options)


def read_unlabeled(format_name: str, paths: dict, options: dict):
    """uint8 (N, C, H, W) images of an unlabeled source (config dataset.unlabeled)."""
    module = format_module(format_name)
    if not hasattr(module, "read_unlabeled"):
        raise DatasetFormatError(f"format {format_name!r} cannot serve as config key dataset.unlabeled")
    return module.read_unlabeled(paths, options)


def index_dataset(format_name: str, paths: dict, options: dict) -> DatasetIndex:
    """The labels of both splits in decode order, without decoding an image where the format can."""
    module = format_module(format_name)
    if hasattr(module, "index"):
        return module.index(paths, options)
    dataset = module.read(paths, options)
    return DatasetIndex(dataset.train_labels, dataset.test_labels, dataset.class_names, dataset.sources)


def decode_images(format_name: str, paths: dict, options: dict, split: str, positions) -> np.ndarray:
    """uint8 (n, C, H, W): the images at sorted `positions` of raw split "train" or "test"."""
    module = format_module(format_name)
    positions = np.asarray(positions, dtype=np.int64)
    if hasattr(module, "decode"):
        return module.decode(paths, options, split, positions)
    return getattr(module.read(paths, options), f"{split}_images")[positions]


def count_unlabeled(format_name: str, paths: dict, options: dict) -> int:
    module = format_module(format_name)
    if hasattr(module, "count_unlabeled"):
        return module.count_unlabeled(paths, options)
    return len(read_unlabeled(format_name, paths, options))


def decode_unlabeled(format_name: str, paths: dict, options: dict, positions) -> np.ndarray:
    module = format_module(format_name)
    positions = np.asarray(positions, dtype=np.int64)
    if hasattr(module, "decode_unlabeled"):
        return module.decode_unlabeled(paths, options, positions)
    return read_unlabeled(format_name, paths, options)[positions]


__all__ = ["DatasetFormatError", "DatasetIndex", "FORMATS", "RawDataset", "count_unlabeled", "decode_images",
           "decode_unlabeled", "format_options", "index_dataset", "read_dataset", "read_unlabeled"]
