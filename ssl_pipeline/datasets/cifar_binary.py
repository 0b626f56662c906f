"""CIFAR-10 and CIFAR-100, binary version (dataset.format: cifar_binary; Krizhevsky 2009,
https://www.cs.toronto.edu/~kriz/cifar.html). One archive (role `archive`). We read the binary
version, not the python one, because it is plain bytes: the python version is pickled, and loading a
pickle runs code from the file.

A record is the label byte(s) then 3,072 pixel bytes: 1,024 red, 1,024 green, 1,024 blue, each 32x32
row-major, which is (C, H, W) order as stored. CIFAR-10 (`cifar-10-batches-bin/`): 1 label byte,
data_batch_1..5.bin for training, test_batch.bin, class names in batches.meta.txt. CIFAR-100
(`cifar-100-binary/`): a coarse then a fine label byte, train.bin, test.bin, names in
coarse_label_names.txt and fine_label_names.txt; config dataset.cifar_binary.labels picks fine or coarse.
"""
import re

import numpy as np

from ssl_pipeline.datasets.archive import read_members
from ssl_pipeline.datasets.common import DatasetFormatError, RawDataset, name_lines, records

PIXELS = 3 * 32 * 32
CIFAR10_TRAIN = re.compile(r"(^|/)data_batch_([1-5])\.bin$")
WANTED = re.compile(r"(^|/)(data_batch_[1-5]\.bin|test_batch\.bin|batches\.meta\.txt|train\.bin|test\.bin|"
                    r"(coarse|fine)_label_names\.txt)$")


def basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def split_records(data: bytes, label_bytes: int, label_index: int, source: str):
    rows = records(data, label_bytes + PIXELS, source)
    return (np.ascontiguousarray(rows[:, label_bytes:].reshape(-1, 3, 32, 32)),
            rows[:, label_index].astype(np.int64))


def read(paths: dict, options: dict) -> RawDataset:
    archive = paths["archive"]
    members = {basename(name): (name, data) for name, data in read_members(archive, lambda n: bool(WANTED.search(n)))}

    def source(base):
        return f"{archive}: member {members[base][0]!r}"

    if "test_batch.bin" in members:  # CIFAR-10
        batches = sorted((base for base in members if CIFAR10_TRAIN.search(base)))
        if len(batches) != 5:
            raise DatasetFormatError(f"{archive}: CIFAR-10 needs data_batch_1.bin .. data_batch_5.bin, found {batches}")
        parts = [split_records(members[base][1], 1, 0, source(base)) for base in batches]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = split_records(members["test_batch.bin"][1], 1, 0, source("test_batch.bin"))
        names_file = "batches.meta.txt"
    elif "train.bin" in members and "test.bin" in members:  # CIFAR-100
        fine = options.get("labels", "fine") == "fine"
        train = split_records(members["train.bin"][1], 2, int(fine), source("train.bin"))
        test = split_records(members["test.bin"][1], 2, int(fine), source("test.bin"))
        names_file = "fine_label_names.txt" if fine else "coarse_label_names.txt"
    else:
        raise DatasetFormatError(f"{archive}: no CIFAR binary files in it (expected cifar-10-batches-bin/test_batch.bin "
                                 "or cifar-100-binary/train.bin and test.bin)")
    names = name_lines(members[names_file][1]) if names_file in members else None
    return RawDataset(*train, *test, class_names=names,
                      sources={"train": f"{archive} (training records)", "test": f"{archive} (test records)"})
