"""ILSVRC2012, the ImageNet-1k classification data (dataset.format: imagenet; Russakovsky et al. 2015), from
its published archives, read in place: nothing is extracted to disk. Four files, each its own spec:

    archive      dataset.archive: ILSVRC2012_img_train.tar, a tar of 1,000 per-class tars n01440764.tar ...,
                 each holding that class's images n01440764_10026.JPEG ... (1,281,167 in all)
    val_archive  dataset.imagenet.val_archive: ILSVRC2012_img_val.tar, 50,000 flat images
                 ILSVRC2012_val_00000001.JPEG ... (50 per class): the test split
    val_labels   dataset.imagenet.val_labels: Kaggle's LOC_val_solution.csv, a header "ImageId,PredictionString"
                 then "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295" per image:
                 its class (wnid) and boxes, each box repeating the wnid; only the first wnid is read
    synsets      dataset.imagenet.synsets: Kaggle's LOC_synset_mapping.txt, "n01440764 tench, Tinca tinca"
                 per line, the 1,000 classes sorted by wnid (torchvision's class order)

The tars come from https://image-net.org/download-images (after registration); the two text files from the
ImageNet Object Localization Challenge, https://www.kaggle.com/c/imagenet-object-localization-challenge/data.
Why Kaggle's label files: they are plain text, keyed by wnid and by image name, so a line is checked on
its own. The devkit's data/ILSVRC2012_validation_ground_truth.txt instead gives one ILSVRC2012_ID per
line, which is not the sorted-wnid order, and only the devkit's meta.mat (MATLAB format: scipy, which the
preprocess env does not have) maps those ids to wnids.

Classes: dataset.imagenet.classes (a list of wnids, e.g. ImageNet-100's), or null for every class tar of
the train archive; class k is the k-th of them in sorted-wnid order, and its name the synset mapping's.
Decode order, which `decode` numbers by position: train, class by class in that order and within a class
by member name; test, the validation images of those classes, by name.

Stored images: RGB (ImageNet has greyscale and CMYK JPEGs, and one PNG named .JPEG), shorter side
resized to dataset.imagenet.image_size (bilinear, antialiased; JPEGs are first decoded at 1/2, 1/4 or
1/8 scale by Pillow's draft() where that stays above the size, which makes downscaling several times
faster), then the centre square. Trade-off: pretraining's random resized crop then works on the stored
square, so a crop never reaches the ring outside it (a quarter of the width of a 4:3 photo) that
torchvision's on-the-fly pipeline samples from the full image, and its output has the stored size; a
smaller size cuts disk and memory quadratically (224: 150,528 bytes an image; 256: 196,608; 64: 12,288).

Reading: both tars must be plain (uncompressed), as published, so that every member sits at a fixed
byte offset. The outer tar is listed header by header, then each chosen class tar inside it (512 bytes
of header per image, no image data), and an image is read at its offset with os.pread: `decode` reads
only its own images. Members are checked as ssl_pipeline/datasets/archive.py does: no absolute paths or
'..', no links or other special files, sizes bounded.
"""
import csv
import io
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_pipeline.datasets.archive import ArchiveError, safe_name
from ssl_pipeline.datasets.common import DatasetFormatError, DatasetIndex, RawDataset
from ssl_pipeline.datasets.image_folder import decode_threads, resize_and_crop

WNID = re.compile(r"n\d{8}")
CLASS_TAR = re.compile(r"(n\d{8})\.tar")
IMAGE_EXTENSIONS = (".jpeg", ".jpg")
# The largest ILSVRC2012 JPEG is a few MB; a bigger member is no photo of this dataset.
MAX_IMAGE_BYTES = 64 << 20
MAX_MEMBERS = 2_000_000
VAL_HEADER = ["ImageId", "PredictionString"]


@dataclass(frozen=True)
class Member:
    """An image inside a plain tar: its name for messages and where its bytes lie in the outer file."""
    name: str
    offset: int
    size: int


# ---------------------------------------------------------------------------------------------------
# Listing the tars (headers only)
# ---------------------------------------------------------------------------------------------------

def checked(tar: tarfile.TarFile, where: str):
    """The regular-file members of `tar`, each checked before use; directories are skipped."""
    members, count = iter(tar), 0
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except tarfile.TarError as error:  # a cut or corrupt header, data running past the end
            raise DatasetFormatError(f"{where}: not a readable tar after {count:,} members ({error})") from error
        count += 1
        if count > MAX_MEMBERS:
            raise ArchiveError(f"{where}: more than {MAX_MEMBERS:,} members")
        name = safe_name(where, member.name)
        if member.issym() or member.islnk():
            raise ArchiveError(f"{where}: member {name!r} is a link (to {member.linkname!r}); links are rejected")
        if member.isdir():
            continue
        if not member.isfile() or member.issparse():
            raise ArchiveError(f"{where}: member {name!r} is not a regular file")
        yield name, member


def open_plain_tar(path, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except (tarfile.TarError, OSError) as error:
        raise DatasetFormatError(f"{path}: not a plain (uncompressed) tar, which ILSVRC2012's archives are and "
                                 f"which lets every image be read at its own offset ({error})") from error


def image_member(where: str, name: str, member: tarfile.TarInfo, offset: int) -> Member:
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        raise DatasetFormatError(f"{where}: member {name!r} is not a JPEG image (.JPEG)")
    if member.size > MAX_IMAGE_BYTES:
        raise ArchiveError(f"{where}: member {name!r} is {member.size:,} bytes, over the limit of "
                           f"{MAX_IMAGE_BYTES:,} per image")
    return Member(name, offset + member.offset_data, member.size)


def file_key(path) -> tuple:
    """What identifies a file's content for the listing caches: path, size and modification time."""
    status = os.stat(path)
    return str(path), status.st_size, status.st_mtime_ns


@lru_cache(maxsize=8)
def class_tars(key: tuple) -> dict:
    """wnid -> (member name, data offset, size) of every per-class tar of the train archive."""
    path = key[0]
    found = {}
    with open_plain_tar(path) as tar:
        for name, member in checked(tar, path):
            match = CLASS_TAR.fullmatch(name)
            if not match:
                raise DatasetFormatError(f"{path}: member {name!r} is not a per-class tar named <wnid>.tar "
                                         "(n01440764.tar ...), as ILSVRC2012_img_train.tar holds")
            found[match.group(1)] = (name, member.offset_data, member.size)
    if not found:
        raise DatasetFormatError(f"{path}: holds no per-class tar <wnid>.tar")
    return found


class Window(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset + size) of an open file."""

    def __init__(self, handle, offset: int, size: int):
        super().__init__()
        self.handle, self.offset, self.size, self.position = handle, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, position, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + position)
        return self.position

    def tell(self):
        return self.position

    def readinto(self, buffer):
        count = max(0, min(len(buffer), self.size - self.position))
        data = os.pread(self.handle.fileno(), count, self.offset + self.position) if count else b""
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


@lru_cache(maxsize=2048)
def class_images(key: tuple, wnid: str) -> tuple:
    """The images of one class tar, sorted by name, each named <class tar>/<image> and placed at its
    offset in the outer file."""
    path = key[0]
    tar_name, offset, size = class_tars(key)[wnid]
    where = f"{path}: class tar {tar_name}"
    with open(path, "rb") as handle, open_plain_tar(where, fileobj=Window(handle, offset, size)) as inner:
        images = [image_member(path, f"{tar_name}/{name}", member, offset) for name, member in checked(inner, where)]
    if not images:
        raise DatasetFormatError(f"{where} holds no image")
    return tuple(sorted(images, key=lambda image: image.name))


@lru_cache(maxsize=8)
def val_images(key: tuple) -> tuple:
    path = key[0]
    with open_plain_tar(path) as tar:
        images = [image_member(path, name, member, 0) for name, member in checked(tar, path)]
    return tuple(sorted(images, key=lambda image: image.name))


# ---------------------------------------------------------------------------------------------------
# The text files
# ---------------------------------------------------------------------------------------------------

def read_synsets(path) -> dict:
    """wnid -> name from LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca" per line."""
    synsets = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not WNID.fullmatch(wnid) or not name.strip():
            raise DatasetFormatError(f"{path}: line {number} is {line!r}, not '<wnid> <name>' "
                                     "(n01440764 tench, Tinca tinca)")
        if wnid in synsets:
            raise DatasetFormatError(f"{path}: line {number}: {wnid} is listed twice")
        synsets[wnid] = name.strip()
    if not synsets:
        raise DatasetFormatError(f"{path}: no synset in it")
    return synsets


def read_val_labels(path, synsets: dict) -> dict:
    """image id (ILSVRC2012_val_00000001) -> wnid from LOC_val_solution.csv."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header != VAL_HEADER:
            raise DatasetFormatError(f"{path}: first line is {header}, not the header {','.join(VAL_HEADER)} "
                                     "of Kaggle's LOC_val_solution.csv")
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            wnid = row[1].split()[0] if len(row) == 2 and row[1].split() else None
            if wnid is None or not row[0]:
                raise DatasetFormatError(f"{path}: line {number} is {','.join(row)!r}, not "
                                         "'<ImageId>,<wnid> <x> <y> <x> <y> ...'")
            if wnid not in synsets:
                raise DatasetFormatError(f"{path}: line {number}: {row[0]} is labelled {wnid}, which is not "
                                         "in the synset list")
            if row[0] in labels:
                raise DatasetFormatError(f"{path}: line {number}: {row[0]} is labelled twice")
            labels[row[0]] = wnid
    return labels


# ---------------------------------------------------------------------------------------------------
# Classes, labels and positions
# ---------------------------------------------------------------------------------------------------

def chosen_classes(paths: dict, options: dict, synsets: dict) -> list:
    """The sorted wnids of the classes read: config dataset.imagenet.classes, or every class tar."""
    archive = paths["archive"]
    available = class_tars(file_key(archive))
    for wnid, (name, _, _) in sorted(available.items()):
        if wnid not in synsets:
            raise DatasetFormatError(f"{archive}: member {name!r} is the class tar of {wnid}, which is not in the "
                                     f"synset list {paths['synsets']}")
    wanted = options.get("classes")
    if wanted is None:
        return sorted(available)
    if len(set(wanted)) != len(wanted):
        twice = sorted({wnid for wnid in wanted if wanted.count(wnid) > 1})
        raise DatasetFormatError(f"config key dataset.imagenet.classes lists {', '.join(twice)} more than once")
    missing = [wnid for wnid in wanted if wnid not in available]
    if missing:
        raise DatasetFormatError(f"config key dataset.imagenet.classes names {len(missing)} classes without a class "
                                 f"tar in {archive}: {', '.join(missing[:10])}")
    return sorted(wanted)


class Plan:
    """Everything index and decode need, read once: classes, the train images per class in decode order,
    and the test images with their labels."""

    def __init__(self, paths: dict, options: dict):
        self.paths, self.options = paths, options
        self.synsets = read_synsets(paths["synsets"])
        self.classes = chosen_classes(paths, options, self.synsets)
        self.train_key = file_key(paths["archive"])
        self.test_images, self.test_labels = self.test_split()

    def train_class_images(self, index: int) -> tuple:
        return class_images(self.train_key, self.classes[index])

    def test_split(self):
        archive, labels_file = self.paths["val_archive"], self.paths["val_labels"]
        images = val_images(file_key(archive))
        labels = read_val_labels(labels_file, self.synsets)
        if len(labels) != len(images):
            raise DatasetFormatError(f"{labels_file}: {len(labels):,} entries for the {len(images):,} images of "
                                     f"{archive}; the validation labels must list each image once")
        number = {wnid: index for index, wnid in enumerate(self.classes)}
        kept, kept_labels = [], []
        for image in images:
            image_id = Path(image.name).stem
            if image_id not in labels:
                raise DatasetFormatError(f"{archive}: member {image.name!r} has no entry {image_id} in {labels_file}")
            if labels[image_id] in number:
                kept.append(image)
                kept_labels.append(number[labels[image_id]])
        if not kept:
            raise DatasetFormatError(f"{archive}: no validation image of the {len(self.classes)} chosen classes "
                                     f"(by {labels_file})")
        return kept, np.asarray(kept_labels, dtype=np.int64)

    def train_labels(self) -> np.ndarray:
        counts = [len(self.train_class_images(index)) for index in range(len(self.classes))]
        return np.repeat(np.arange(len(self.classes), dtype=np.int64), counts)

    def train_members(self, positions: np.ndarray) -> list:
        """The train images at sorted positions, listing class tars only as far as the last position."""
        chosen, start, cursor = [], 0, 0
        for index in range(len(self.classes)):
            if cursor == len(positions):
                break
            images = self.train_class_images(index)
            while cursor < len(positions) and positions[cursor] < start + len(images):
                chosen.append(images[positions[cursor] - start])
                cursor += 1
            start += len(images)
        if cursor < len(positions):
            raise DatasetFormatError(f"{self.paths['archive']}: position {int(positions[cursor])} is past its "
                                     f"{start:,} training images of the chosen classes")
        return chosen

    def sources(self) -> dict:
        paths = self.paths
        return {"train": str(paths["archive"]), "test": f"{paths['val_archive']} by {paths['val_labels']}"}


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------

def decode_image(where: str, name: str, data: bytes, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size): RGB, shorter side to `size`, centre square."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that stays >= size
            image = image.convert("RGB") if image.mode != "RGB" else image
            image.load()
            pixels = np.asarray(resize_and_crop(image, (size, size)), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DatasetFormatError(f"{where}: member {name!r} does not decode as an image ({error})") from error
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_members(archive, members: list, size: int, where: str) -> np.ndarray:
    """uint8 (n, 3, size, size) of the members, each read at its offset and decoded in parallel threads
    (os.pread and Pillow release the GIL)."""
    out = np.empty((len(members), 3, size, size), dtype=np.uint8)
    with open(archive, "rb") as handle:
        def one(item):
            index, member = item
            data = os.pread(handle.fileno(), member.size, member.offset)
            if len(data) != member.size:
                raise DatasetFormatError(f"{where}: member {member.name!r} is cut short: the file ends "
                                         f"{member.size - len(data):,} bytes before it does")
            out[index] = decode_image(where, member.name, data, size)

        with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
            list(pool.map(one, enumerate(members)))
    return out


def index(paths: dict, options: dict) -> DatasetIndex:
    """Labels of both splits in decode order and the class names, from the tars' headers and the text
    files alone: no image is decoded."""
    plan = Plan(paths, options)
    return DatasetIndex(plan.train_labels(), plan.test_labels, [plan.synsets[wnid] for wnid in plan.classes],
                        plan.sources())


def decode(paths: dict, options: dict, split: str, positions) -> np.ndarray:
    """uint8 (n, 3, S, S): the images at sorted `positions` of split "train" or "test" (decode order)."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and (np.any(np.diff(positions) <= 0) or positions[0] < 0):
        raise ValueError("positions must be sorted, distinct and non-negative")
    plan = Plan(paths, options)
    if split == "train":
        members, archive = plan.train_members(positions), paths["archive"]
        where = str(archive)
    elif split == "test":
        if len(positions) and positions[-1] >= len(plan.test_images):
            raise DatasetFormatError(f"{paths['val_archive']}: position {int(positions[-1])} is past its "
                                     f"{len(plan.test_images):,} validation images of the chosen classes")
        members, archive = [plan.test_images[position] for position in positions], paths["val_archive"]
        where = str(archive)
    else:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return decode_members(archive, members, int(options["image_size"]), where)


def read(paths: dict, options: dict) -> RawDataset:
    found = index(paths, options)
    train = decode(paths, options, "train", np.arange(len(found.train_labels)))
    test = decode(paths, options, "test", np.arange(len(found.test_labels)))
    return RawDataset(train, found.train_labels, test, found.test_labels, class_names=found.class_names,
                      sources=found.sources)
