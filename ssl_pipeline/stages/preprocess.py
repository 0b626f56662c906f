"""From the raw files, whatever their format (ssl_pipeline/datasets/), to compact uint8 arrays, a
validation split, labeled subsets and a dataset card.

Everything written here lives in one directory:
    {split}_images.npy   uint8 (N, C, H, W)      for split in train, val, test
    {split}_labels.npy   uint8 (N,), uint16 with more than 256 classes
    unlabeled_images.npy uint8 (M, C, H, W)      config dataset.unlabeled's images (M = 0 without one)
    normalization.json   per-channel mean/std of the training split, and the image shape
    card.json            counts per class per split, checksums, statistics
Pretraining reads only train_images.npy, unlabeled_images.npy and normalization.json, never a label
file. With config preprocess.shard_images set, ssl_pipeline/stages/preprocess_shards.py writes the same
files in jobs of a shard each, every {split}_images.npy replaced by an index file over its shards.

Labeled subsets (`write_label_subset`) are separate jobs, one per seed and fraction, so that adding a
seed or a fraction to the config leaves the data files, and every model trained on them, untouched.
"""
import logging
from pathlib import Path

import numpy as np

from ssl_pipeline.core.artifacts import atomic_path, file_digest as sha256_of, read_json, write_json
from ssl_pipeline.core.raw_files import raw_paths
from ssl_pipeline.datasets import DatasetFormatError, RawDataset, format_options, read_dataset, read_unlabeled

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
# Images per chunk of the normalisation sums (float64 copies of one chunk at a time).
NORMALIZATION_CHUNK = 4096


def save_array(path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, array)


# ---------------------------------------------------------------------------------------------------
# Validation of the raw data
# ---------------------------------------------------------------------------------------------------

def check_classes(dataset: RawDataset, class_names) -> int:
    """Read the number of classes off the data and check both splits against it."""
    num_classes = int(dataset.train_labels.max()) + 1
    missing = sorted(set(range(num_classes)) - set(np.unique(dataset.train_labels).tolist()))
    if missing:
        raise DatasetFormatError(
            f"{dataset.sources['train']}: labels must cover 0..{num_classes - 1}, classes {missing} have no example"
        )
    if int(dataset.test_labels.max()) >= num_classes:
        raise DatasetFormatError(
            f"{dataset.sources['test']}: label {int(dataset.test_labels.max())} is out of range; "
            f"the training labels define classes 0..{num_classes - 1}"
        )
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f"config key dataset.class_names lists {len(class_names)} names, the data has {num_classes} classes"
        )
    return num_classes


# ---------------------------------------------------------------------------------------------------
# Splits and subsets
# ---------------------------------------------------------------------------------------------------

def per_class_permutations(labels: np.ndarray, num_classes: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_validation_split(labels, num_classes, fraction, seed):
    """Return (train_indices, val_indices): the same fraction of every class goes to validation."""
    val_parts, train_parts = [], []
    for members in per_class_permutations(labels, num_classes, seed):
        n_val = int(round(fraction * len(members)))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def labeled_subset(labels, num_classes, fraction, seed) -> np.ndarray:
    """Sorted indices of a stratified subset. Subsets of one seed are nested: every fraction takes a
    prefix of the same per-class permutation, so 1% is inside 10% is inside 100%."""
    prefixes = [members[: max(1, int(round(fraction * len(members))))]
                for members in per_class_permutations(labels, num_classes, seed)]
    return np.sort(np.concatenate(prefixes))


def write_label_subset(labels_path, card_path, fraction: float, seed: int, out_path) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"a label fraction must be in (0, 1], got {fraction}")
    num_classes = read_json(card_path)["num_classes"]
    indices = labeled_subset(np.load(labels_path), num_classes, fraction, seed)
    save_array(out_path, indices)
    log.info("labeled subset seed %d fraction %g: %d images", seed, fraction, len(indices))
    return len(indices)


def channel_sums(chunk: np.ndarray):
    """Per-channel sums of the values and of their squares, in [0, 1] units, of uint8 (n, C, H, W)."""
    values = chunk.astype(np.float64) / 255.0
    return values.sum(axis=(0, 2, 3)), np.square(values).sum(axis=(0, 2, 3))


def statistics_from_sums(total, squares, count: int, image_shape) -> dict:
    pixels = count * image_shape[1] * image_shape[2]
    mean = total / pixels
    return {"mean": mean.tolist(), "std": np.sqrt(squares / pixels - mean ** 2).tolist(),
            "image_shape": list(image_shape)}


def normalization_statistics(images: np.ndarray, chunk: int = NORMALIZATION_CHUNK) -> dict:
    """Per-channel mean and std in [0, 1] units of uint8 (N, C, H, W) images, summed in chunks: a
    float64 copy of all of Fashion-MNIST's training images would take 376 MB. Sharded preprocessing sums
    the same chunks (ssl_pipeline/stages/preprocess_shards.py), so that it gets the same figures."""
    total, squares = np.zeros(images.shape[1]), np.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        chunk_total, chunk_squares = channel_sums(images[start:start + chunk])
        total += chunk_total
        squares += chunk_squares
    return statistics_from_sums(total, squares, len(images), images.shape[1:])


def label_dtype(num_classes: int, source) -> type:
    """uint8 as IDX stores labels, for up to 256 classes (so the arrays of every dataset we had stay byte for
    byte what they were); uint16 for more (ImageNet's 1,000). Readers widen them to int64."""
    if num_classes <= 256:
        return np.uint8
    if num_classes <= 65536:
        return np.uint16
    raise DatasetFormatError(f"{source}: {num_classes} classes; labels are stored as uint16 (65,536 at most)")


def class_counts(labels, num_classes) -> list:
    return np.bincount(labels, minlength=num_classes).tolist()


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def raw_inputs(dataset: dict, raw_dir):
    """(raw paths by role, format options, unlabeled source or None) of config dataset, as the
    preprocessing functions take them; unlabeled: {"format", "paths", "options"}."""
    paths = raw_paths(dataset, raw_dir)
    unlabeled = dataset.get("unlabeled")
    if unlabeled:
        unlabeled = {"format": unlabeled["format"], "paths": paths["unlabeled"],
                     "options": {**dataset["image_folder"], "root": unlabeled.get("root", "")}}
    return paths["dataset"], format_options(dataset), unlabeled


def read_unlabeled_source(unlabeled, image_shape) -> np.ndarray:
    """The unlabeled source's images, which must have the labeled images' shape; (0, C, H, W) without one."""
    if not unlabeled:
        return np.zeros((0, *image_shape), dtype=np.uint8)
    images = read_unlabeled(unlabeled["format"], unlabeled["paths"], unlabeled.get("options") or {})
    if images.shape[1:] != tuple(image_shape):
        source = ", ".join(str(path) for path in unlabeled["paths"].values())
        raise DatasetFormatError(f"{source}: unlabeled images are {images.shape[1:]} (C, H, W), the labeled ones "
                                 f"{tuple(image_shape)}; config key dataset.unlabeled must give the same size and mode")
    return images


def preprocess(raw: dict, out_dir, dataset_name: str, validation_fraction: float, split_seed: int,
               class_names=None, data_format: str = "idx", options: dict = None, unlabeled: dict = None) -> dict:
    """Read the raw files (`raw`: role -> path) in `data_format`, check them, and write the directory
    described in the module docstring. unlabeled: {"format", "paths", "options"} of config
    dataset.unlabeled, or None."""
    out_dir = Path(out_dir)
    dataset = read_dataset(data_format, raw, options or {})
    train_images, train_labels = dataset.train_images, dataset.train_labels
    test_images, test_labels = dataset.test_images, dataset.test_labels
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetFormatError(
            f"{dataset.sources.get('test_images', dataset.sources['test'])}: images are {test_images.shape[1:]} "
            f"(C, H, W) but the training images in {dataset.sources.get('train_images', dataset.sources['train'])} "
            f"are {train_images.shape[1:]}"
        )
    num_classes = check_classes(dataset, class_names)
    dtype = label_dtype(num_classes, dataset.sources["train"])
    train_labels, test_labels = train_labels.astype(dtype), test_labels.astype(dtype)
    class_names = class_names or dataset.class_names
    unlabeled_images = read_unlabeled_source(unlabeled, train_images.shape[1:])
    log.info("read %d training, %d test and %d unlabeled images of shape %s, %d classes",
             len(train_images), len(test_images), len(unlabeled_images), train_images.shape[1:], num_classes)

    train_index, val_index = stratified_validation_split(train_labels, num_classes, validation_fraction,
                                                         split_seed)
    splits = {
        "train": (train_images[train_index], train_labels[train_index]),
        "val": (train_images[val_index], train_labels[val_index]),
        "test": (test_images, test_labels),
    }
    for split, (images, labels) in splits.items():
        save_array(out_dir / f"{split}_images.npy", images)
        save_array(out_dir / f"{split}_labels.npy", labels)
    save_array(out_dir / "unlabeled_images.npy", unlabeled_images)

    statistics = normalization_statistics(splits["train"][0])
    write_json(out_dir / "normalization.json", statistics)

    card = {
        "dataset": dataset_name,
        "format": data_format,
        "num_classes": num_classes,
        "class_names": class_names or [str(c) for c in range(num_classes)],
        "image_shape": statistics["image_shape"],
        "normalization": {"mean": statistics["mean"], "std": statistics["std"],
                          "computed_on": "train split only"},
        "validation": {"fraction": validation_fraction, "seed": split_seed, "stratified": True},
        "splits": {split: {"count": len(labels), "per_class": class_counts(labels, num_classes)}
                   for split, (_, labels) in splits.items()},
        "unlabeled": {"count": len(unlabeled_images),
                      "format": unlabeled["format"] if unlabeled else None,
                      "used_by": "pretraining only (with the train split); never the kNN memory bank"},
        "raw_sha256": {role: sha256_of(path) for role, path in sorted(raw.items())},
        **({"unlabeled_raw_sha256": {role: sha256_of(path) for role, path in sorted(unlabeled["paths"].items())}}
           if unlabeled else {}),
        "sha256": {**{f"{split}_{kind}.npy": sha256_of(out_dir / f"{split}_{kind}.npy")
                      for split in SPLITS for kind in ("images", "labels")},
                   "unlabeled_images.npy": sha256_of(out_dir / "unlabeled_images.npy")},
    }
    write_json(out_dir / "card.json", card)
    log.info("wrote %s", out_dir)
    return card
