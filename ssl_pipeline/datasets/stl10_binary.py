"""STL-10, binary version (dataset.format: stl10_binary; Coates et al. 2011,
https://cs.stanford.edu/~acoates/stl10/). One archive (role `archive`), plain bytes like CIFAR's:
`stl10_binary/` holds train_X.bin (5,000 images), train_y.bin, test_X.bin (8,000), test_y.bin,
unlabeled_X.bin (100,000 images without labels) and class_names.txt. An image is 3 x 96 x 96 uint8,
each channel stored column-major (so H and W are swapped after reading); labels are 1..10.

As config dataset.unlabeled with this format, unlabeled_X.bin is read: STL-10's point is that the
unlabeled pool is 20 times the labeled one.
"""
import re

import numpy as np

from ssl_pipeline.datasets.archive import read_members
from ssl_pipeline.datasets.common import DatasetFormatError, RawDataset, name_lines, records

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


def members_of(archive, wanted_files) -> dict:
    pattern = re.compile(r"(^|/)(" + "|".join(map(re.escape, wanted_files)) + r")$")
    found = {name.rsplit("/", 1)[-1]: (name, data) for name, data in read_members(archive, lambda n: bool(pattern.search(n)))}
    missing = [name for name in wanted_files if name not in found and name != "class_names.txt"]
    if missing:
        raise DatasetFormatError(f"{archive}: no {', '.join(missing)} in it (an STL-10 binary archive has "
                                 "stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin)")
    return found


def images_of(archive, member) -> np.ndarray:
    name, data = member
    rows = records(data, IMAGE_BYTES, f"{archive}: member {name!r}")
    return np.ascontiguousarray(rows.reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2))  # column-major -> (C, H, W)


def labels_of(archive, member, count: int) -> np.ndarray:
    name, data = member
    labels = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if len(labels) != count:
        raise DatasetFormatError(f"{archive}: member {name!r} holds {len(labels)} labels for {count} images")
    if labels.min() < 1 or labels.max() > 10:
        raise DatasetFormatError(f"{archive}: member {name!r} has labels outside 1..10")
    return labels - 1


def read(paths: dict, options: dict) -> RawDataset:
    archive = paths["archive"]
    found = members_of(archive, FILES)
    train_images, test_images = images_of(archive, found["train_X.bin"]), images_of(archive, found["test_X.bin"])
    names = name_lines(found["class_names.txt"][1]) if "class_names.txt" in found else None
    return RawDataset(train_images, labels_of(archive, found["train_y.bin"], len(train_images)),
                      test_images, labels_of(archive, found["test_y.bin"], len(test_images)), class_names=names,
                      sources={"train": f"{archive}: train_y.bin", "test": f"{archive}: test_y.bin"})


def read_unlabeled(paths: dict, options: dict) -> np.ndarray:
    archive = paths["archive"]
    return images_of(archive, members_of(archive, ("unlabeled_X.bin",))["unlabeled_X.bin"])
