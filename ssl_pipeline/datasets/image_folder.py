"""Folders of PNG or JPEG images in an archive (dataset.format: image_folder), one subfolder per class,
the convention of torchvision's ImageFolder:

    <train_root>/<class>/<any/path/>image.png      <test_root>/<class>/...

Class names are the train root's subfolders, sorted; class k is the k-th name. Within a split, images
are ordered by their path below the class folder, then by class: files named by an index (00042.png)
keep their original order whatever their class. Pillow decodes them in parallel threads.

config dataset.image_folder: train_root and test_root (paths inside the archive), mode (L: grayscale,
RGB: colour), convert (whether an image of the other mode may be converted; if not, it is an error),
image_size ([H, W], or null to require one size throughout). An image of another size is resized
(shorter side to the target, bilinear with antialiasing, then a centre crop), and only then.
"""
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_pipeline.datasets.archive import read_members
from ssl_pipeline.datasets.common import DatasetFormatError, DatasetIndex, RawDataset

EXTENSIONS = (".png", ".jpg", ".jpeg")


def relative(name: str, root: str):
    """`name` below `root`, as parts; None when outside it."""
    parts, root_parts = PurePosixPath(name).parts, PurePosixPath(root).parts if root else ()
    return parts[len(root_parts):] if parts[:len(root_parts)] == root_parts else None


def collect(archive, roots: dict) -> dict:
    """root -> {class: [(path below the class folder, member name, bytes)]}, empty classes included."""
    found = {root: {} for root in roots.values()}

    def place(name):
        for root in found:
            parts = relative(name, root)
            if parts:
                return root, parts
        return None, None

    for name, data in read_members(archive, lambda n: place(n)[0] is not None, directories=True):
        root, parts = place(name)
        if root is None:
            continue
        if data is None and len(parts) == 1:  # a class folder, perhaps empty
            found[root].setdefault(parts[0], [])
        elif data is not None and len(parts) >= 2 and name.lower().endswith(EXTENSIONS):
            found[root].setdefault(parts[0], []).append(("/".join(parts[1:]), name, data))
        # Other files (a README, .DS_Store, a CSV) beside or inside the class folders are not images.
    return found


def decode_image(archive, name: str, data: bytes, options: dict) -> np.ndarray:
    """One image as uint8 (C, H, W), checked, converted and resized as config dataset.image_folder says."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = options["mode"]
            if image.mode != mode:
                if not options["convert"]:
                    raise DatasetFormatError(f"{archive}: member {name!r} has mode {image.mode}, but config key "
                                             f"dataset.image_folder.mode is {mode}, and "
                                             "dataset.image_folder.convert is false")
                image = image.convert(mode)
            target = options.get("image_size")
            if target and (image.height, image.width) != tuple(target):
                image = resize_and_crop(image, target)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DatasetFormatError(f"{archive}: member {name!r} does not decode as an image ({error})") from error
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def resize_and_crop(image, target):
    """Shorter side (relative to the target's shape) to the target, then the centre crop."""
    height, width = target
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR, reducing_gap=None)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def decode_threads() -> int:
    """Pillow releases the GIL while it decodes; more than 8 threads gains nothing on small images."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def stack(archive, items: list, options: dict, threads: int) -> np.ndarray:
    """Decode (member name, bytes) pairs in parallel into one (N, C, H, W) array of one size."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = list(pool.map(lambda item: decode_image(archive, item[0], item[1], options), items))
    first = images[0].shape
    for (name, _), image in zip(items, images):
        if image.shape != first:
            raise DatasetFormatError(
                f"{archive}: member {name!r} is {image.shape[2]}x{image.shape[1]} pixels, but "
                f"{items[0][0]!r} is {first[2]}x{first[1]}; set config key dataset.image_folder.image_size to "
                "resize them to one size")
    return np.stack(images)


def ordered_members(archive, classes: dict, class_names: list, root: str) -> list:
    """[(path below the class folder, class index, member name, bytes)] in the split's image order."""
    ordered = sorted((path, index, name, data) for index, class_name in enumerate(class_names)
                     for path, name, data in classes.get(class_name, []))
    if not ordered:
        raise DatasetFormatError(f"{archive}: no PNG or JPEG images under {root!r}")
    return ordered


def split(archive, classes: dict, class_names: list, options: dict, threads: int, root: str):
    ordered = ordered_members(archive, classes, class_names, root)
    images = stack(archive, [(name, data) for _, _, name, data in ordered], options, threads)
    return images, np.array([index for _, index, _, _ in ordered], dtype=np.int64)


def check_classes(archive, found: dict, train_root: str, test_root: str) -> list:
    train, test = found[train_root], found[test_root]
    if not train:
        raise DatasetFormatError(f"{archive}: no class folders under {train_root!r} (config key "
                                 "dataset.image_folder.train_root)")
    for root, classes in ((train_root, train), (test_root, test)):
        for name, images in sorted(classes.items()):
            if not images:
                raise DatasetFormatError(f"{archive}: class folder {root}/{name} holds no PNG or JPEG image")
    extra = sorted(set(test) - set(train))
    if extra:
        raise DatasetFormatError(f"{archive}: test classes {extra} (under {test_root!r}) are missing from the "
                                 f"training classes under {train_root!r}")
    return sorted(train)


def roots_and_classes(paths: dict, options: dict):
    """The archive's members by root and class, its class names, and the train and test roots."""
    archive = paths["archive"]
    train_root, test_root = options["train_root"].strip("/"), options["test_root"].strip("/")
    found = collect(archive, {"train": train_root, "test": test_root})
    return found, check_classes(archive, found, train_root, test_root), train_root, test_root


def read(paths: dict, options: dict) -> RawDataset:
    archive, threads = paths["archive"], decode_threads()
    found, class_names, train_root, test_root = roots_and_classes(paths, options)
    train = split(archive, found[train_root], class_names, options, threads, train_root)
    test = split(archive, found[test_root], class_names, options, threads, test_root)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DatasetFormatError(f"{archive}: test images are {test[0].shape[1:]} (C, H, W), training images "
                                 f"{train[0].shape[1:]}; set config key dataset.image_folder.image_size")
    return RawDataset(*train, *test, class_names=class_names,
                      sources={"train": f"{archive}: {train_root}", "test": f"{archive}: {test_root}"})


def index(paths: dict, options: dict) -> DatasetIndex:
    """The labels in read()'s order, from the member names alone (sharded preprocessing plans on them)."""
    archive = paths["archive"]
    found, class_names, train_root, test_root = roots_and_classes(paths, options)
    labels = [np.array([label for _, label, _, _ in ordered_members(archive, found[root], class_names, root)],
                       dtype=np.int64) for root in (train_root, test_root)]
    return DatasetIndex(*labels, class_names=class_names,
                        sources={"train": f"{archive}: {train_root}", "test": f"{archive}: {test_root}"})


def decode(paths: dict, options: dict, split_name: str, positions) -> np.ndarray:
    """The images at sorted `positions` of split "train" or "test", in read()'s order; only they are decoded."""
    found, class_names, train_root, test_root = roots_and_classes(paths, options)
    root = train_root if split_name == "train" else test_root
    ordered = ordered_members(paths["archive"], found[root], class_names, root)
    return stack(paths["archive"], [ordered[p][2:] for p in positions], options, decode_threads())


def unlabeled_members(paths: dict, options: dict) -> list:
    archive, root = paths["archive"], options.get("root", "").strip("/")
    items = sorted((name, data) for name, data in read_members(archive, lambda n: relative(n, root) is not None)
                   if name.lower().endswith(EXTENSIONS))
    if not items:
        raise DatasetFormatError(f"{archive}: no PNG or JPEG images under {root or 'its top level'!r}")
    return items


def read_unlabeled(paths: dict, options: dict) -> np.ndarray:
    """Every PNG or JPEG under options["root"] (no class folders needed)."""
    return stack(paths["archive"], unlabeled_members(paths, options), options, decode_threads())


def count_unlabeled(paths: dict, options: dict) -> int:
    return len(unlabeled_members(paths, options))


def decode_unlabeled(paths: dict, options: dict, positions) -> np.ndarray:
    items = unlabeled_members(paths, options)
    return stack(paths["archive"], [items[p] for p in positions], options, decode_threads())
