"""Dataset formats, chosen by config dataset.format. A format's reader turns the downloaded files (a
role -> path map, the roles of config dataset.files) into a RawDataset: uint8 (N, C, H, W) images and
int64 labels per split, and the class names the data carry. Preprocessing then writes the same arrays,
card and normalisation whatever the format. To add a format: write its module with a
read(paths, options) -> RawDataset (and read_unlabeled, if it has unlabeled images), add it to FORMATS,
and describe its files in config/config.yaml and the schema."""
from ssl_pipeline.datasets import cifar_binary, idx, image_folder, stl10_binary
from ssl_pipeline.datasets.common import DatasetFormatError, RawDataset

FORMATS = {"idx": idx, "image_folder": image_folder, "cifar_binary": cifar_binary, "stl10_binary": stl10_binary}


def format_module(name: str):
    if name not in FORMATS:
        raise DatasetFormatError(f"config key dataset.format is {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_options(dataset: dict) -> dict:
    """The options section of config dataset that its format reads ({} for formats without one)."""
    return dataset.get(dataset["format"]) or {} if dataset["format"] in ("image_folder", "cifar_binary") else {}


def read_dataset(format_name: str, paths: dict, options: dict) -> RawDataset:
    return format_module(format_name).read(paths, options)


def read_unlabeled(format_name: str, paths: dict, options: dict):
    """uint8 (N, C, H, W) images of an unlabeled source (config dataset.unlabeled)."""
    module = format_module(format_name)
    if not hasattr(module, "read_unlabeled"):
        raise DatasetFormatError(f"format {format_name!r} cannot serve as config key dataset.unlabeled")
    return module.read_unlabeled(paths, options)


__all__ = ["DatasetFormatError", "FORMATS", "RawDataset", "format_options", "read_dataset", "read_unlabeled"]
