"""Preprocessing in shards (config preprocess.shard_images: K images per shard, or auto): three steps, each
a job, so that decoding runs as many jobs in parallel, on one machine or as Slurm jobs.

    plan   reads only the labels (the format's index(); ssl_pipeline/datasets/__init__.py), checks them and
           draws the validation split exactly as unsharded preprocessing does; writes the label files and
           shards/plan.json + shards/positions.npz: which raw images go to which shard of which split
    shard  one job per shard: decodes only its images, writes shards/<split>_images/<k:05d>.npy and beside
           it a .json of what the index needs (count, shape, sha256, the normalisation sums)
    index  checks every shard against its statistics, and writes <split>_images.index.json (the format
           ssl_pipeline/core/arrays.py reads), normalization.json and card.json

The shards of a split are consecutive slices of its logical array, in the order of the unsharded
<split>_images.npy, so both give the same bytes; nothing is merged, so the disk holds each image once.
The normalisation sums are taken over the unsharded run's chunks of NORMALIZATION_CHUNK images: with
whole chunks per shard (auto's choice) the figures are exactly the unsharded ones, else equal to float
rounding.
"""
import logging
import math
import time
from pathlib import Path

import numpy as np

from ssl_pipeline.core.artifacts import atomic_path, file_digest, read_json, write_json
from ssl_pipeline.datasets import DatasetFormatError, count_unlabeled, decode_images, decode_unlabeled, index_dataset
from ssl_pipeline.stages.preprocess import (NORMALIZATION_CHUNK, SPLITS, channel_sums, check_classes, class_counts,
                                            label_dtype, save_array, statistics_from_sums,
                                            stratified_validation_split)

log = logging.getLogger(__name__)
SHARDED_SPLITS = (*SPLITS, "unlabeled")
RAW_SPLIT = {"train": "train", "val": "train", "test": "test"}  # which raw split a split's positions index
PLAN, POSITIONS = "shards/plan.json", "shards/positions.npz"
AUTO_SHARD_BYTES = 1 << 30
INDEX_FORMAT = {"format": "ssl_pipeline.sharded_array", "version": 1, "dtype": "uint8"}


def shard_file(split: str, shard: int) -> str:
    """A shard's path relative to the data directory (and so to the index files beside it)."""
    return f"shards/{split}_images/{shard:05d}.npy"


def stats_file(shard_path: str) -> str:
    return shard_path[:-len(".npy")] + ".json"


def images_per_shard(setting, image_shape) -> int:
    """K, or for auto about AUTO_SHARD_BYTES of uint8 images, in whole normalisation chunks."""
    if setting != "auto":
        return int(setting)
    count = max(1, AUTO_SHARD_BYTES // math.prod(image_shape))
    return count // NORMALIZATION_CHUNK * NORMALIZATION_CHUNK if count >= NORMALIZATION_CHUNK else count


def planned_counts(count: int, per_shard: int) -> list:
    """Images in each shard of a split of `count` images: consecutive slices, the last one short."""
    return [min(per_shard, count - start) for start in range(0, count, per_shard)]


# ---------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------

def plan_shards(raw: dict, out_dir, dataset_name: str, validation_fraction: float, split_seed: int, shard_images,
                class_names=None, data_format: str = "idx", options: dict = None, unlabeled: dict = None) -> dict:
    """Write the label files, the plan and the positions (module docstring); everything is checked before
    anything is written. Arguments as ssl_pipeline.stages.preprocess.preprocess, plus config
    preprocess.shard_images."""
    out_dir, options = Path(out_dir), options or {}
    index = index_dataset(data_format, raw, options)
    num_classes = check_classes(index, class_names)
    dtype = label_dtype(num_classes, index.sources["train"])
    train_labels, test_labels = index.train_labels.astype(dtype), index.test_labels.astype(dtype)
    unlabeled_count = count_unlabeled(unlabeled["format"], unlabeled["paths"], unlabeled["options"]) if unlabeled else 0
    train_index, val_index = stratified_validation_split(train_labels, num_classes, validation_fraction, split_seed)
    positions = {"train": train_index, "val": val_index, "test": np.arange(len(test_labels)),
                 "unlabeled": np.arange(unlabeled_count)}
    labels = {"train": train_labels[train_index], "val": train_labels[val_index], "test": test_labels}
    # auto needs an image's size: decode one.
    shape = decode_images(data_format, raw, options, "train", [0]).shape[1:] if shard_images == "auto" else None
    per_shard = images_per_shard(shard_images, shape)
    class_names = class_names or index.class_names
    plan = {
        "images_per_shard": per_shard,
        "sources": {"train": index.sources["train"], "test": index.sources["test"],
                    "unlabeled": ", ".join(str(path) for path in unlabeled["paths"].values()) if unlabeled else None},
        "splits": {split: {"count": len(positions[split]),
                           "files": [shard_file(split, k) for k in
                                     range(len(planned_counts(len(positions[split]), per_shard)))]}
                   for split in SHARDED_SPLITS},
        # What the card says that the labels alone tell; the index job adds the rest.
        "card": {
            "dataset": dataset_name,
            "format": data_format,
            "num_classes": num_classes,
            "class_names": class_names or [str(c) for c in range(num_classes)],
            "validation": {"fraction": validation_fraction, "seed": split_seed, "stratified": True},
            "splits": {split: {"count": len(labels[split]), "per_class": class_counts(labels[split], num_classes)}
                       for split in SPLITS},
            "unlabeled": {"count": unlabeled_count, "format": unlabeled["format"] if unlabeled else None,
                          "used_by": "pretraining only (with the train split); never the kNN memory bank"},
            "raw_sha256": {role: file_digest(path) for role, path in sorted(raw.items())},
            **({"unlabeled_raw_sha256": {role: file_digest(path) for role, path in sorted(unlabeled["paths"].items())}}
               if unlabeled else {}),
        },
    }
    for split in SPLITS:
        save_array(out_dir / f"{split}_labels.npy", labels[split])
    with atomic_path(out_dir / POSITIONS) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **positions)
    write_json(out_dir / PLAN, plan)
    log.info("planned %s: %d images per shard", ", ".join(
        f"{split} {entry['count']} images in {len(entry['files'])} shards" for split, entry in plan["splits"].items()),
        per_shard)
    return plan


# ---------------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------------

def chunk_sums(images: np.ndarray, offset: int, chunk: int = NORMALIZATION_CHUNK) -> list:
    """The normalisation sums of images offset.. of the split, per chunk of the unsharded run: a chunk
    wholly inside the shard is summed exactly as there, one cut by a shard boundary in pieces."""
    pieces = []
    for number in range(offset // chunk, (offset + len(images) - 1) // chunk + 1):
        start, stop = max(number * chunk, offset) - offset, min((number + 1) * chunk, offset + len(images)) - offset
        total, squares = channel_sums(images[start:stop])
        pieces.append({"chunk": number, "sum": total.tolist(), "squares": squares.tolist()})
    return pieces


def write_shard(raw: dict, data_dir, split: str, shard, data_format: str, options: dict = None,
                unlabeled: dict = None) -> dict:
    """Decode shard `shard` (its number) of `split` as the plan in data_dir says; write it and its statistics."""
    data_dir = Path(data_dir)
    plan = read_json(data_dir / PLAN)
    files, per_shard, number = plan["splits"][split]["files"], plan["images_per_shard"], int(shard)
    if not 0 <= number < len(files):
        raise ValueError(f"{data_dir / PLAN}: split {split} has {len(files)} shards, so there is no shard {shard}")
    with np.load(data_dir / POSITIONS) as saved:
        positions = saved[split][number * per_shard:(number + 1) * per_shard]
    started = time.perf_counter()
    if split == "unlabeled":
        images = decode_unlabeled(unlabeled["format"], unlabeled["paths"], unlabeled["options"], positions)
    else:
        images = decode_images(data_format, raw, options or {}, RAW_SPLIT[split], positions)
    seconds = time.perf_counter() - started
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(positions):
        raise DatasetFormatError(f"{plan['sources'][RAW_SPLIT.get(split, split)]}: format {data_format!r} decoded "
                                 f"{images.dtype} {images.shape} for {len(positions)} images; decode must return "
                                 "uint8 (n, C, H, W)")
    path = data_dir / files[number]
    save_array(path, images)
    # No timings in it: the same images give the same file, so DVC sees an unchanged shard as unchanged.
    stats = {"count": len(images), "shape": list(images.shape[1:]), "bytes": path.stat().st_size,
             "sha256": file_digest(path),
             "chunk_sums": chunk_sums(images, number * per_shard) if split == "train" else []}
    write_json(data_dir / stats_file(files[number]), stats)
    log.info("shard %s %05d: decoded %d images in %.2f s: %.0f images/s", split, number, len(images), seconds,
             len(images) / max(seconds, 1e-9))
    return stats


# ---------------------------------------------------------------------------------------------------
# Index, normalisation and card
# ---------------------------------------------------------------------------------------------------

def shard_header(path: Path):
    """(shape, dtype) from a shard's .npy header, after checking that the file holds all the data it declares."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError) as error:
        raise DatasetFormatError(f"{path}: not a readable .npy shard ({error})") from error
    needed = offset + math.prod(shape) * dtype.itemsize
    if path.stat().st_size != needed or fortran:
        problem = "Fortran order" if fortran else f"{path.stat().st_size:,} bytes, its header declares {needed:,}"
        raise DatasetFormatError(f"{path}: shard is truncated or damaged: {problem}")
    return tuple(shape), dtype


def checked_shard(data_dir: Path, file: str, planned: int) -> dict:
    """The shard's statistics, once its file agrees with them and with the plan."""
    path, stats_path = data_dir / file, data_dir / stats_file(file)
    stats = read_json(stats_path)
    shape, dtype = shard_header(path)
    expected = (planned, *stats["shape"])
    if dtype != np.uint8 or shape != expected or stats["count"] != planned or path.stat().st_size != stats["bytes"]:
        raise DatasetFormatError(f"{path}: holds {dtype} {shape} in {path.stat().st_size:,} bytes, but {stats_path} "
                                 f"and the plan say uint8 {expected} in {stats['bytes']:,} bytes; rerun its "
                                 "preprocess_shard job")
    return stats


def combined_statistics(pieces: list, count: int, image_shape) -> dict:
    """normalization.json from the shards' chunk sums, added in the unsharded run's order."""
    chunks = {}
    for piece in pieces:  # in shard order, so a cut chunk's pieces add up in image order
        total, squares = np.array(piece["sum"]), np.array(piece["squares"])
        if piece["chunk"] in chunks:
            chunks[piece["chunk"]] = (chunks[piece["chunk"]][0] + total, chunks[piece["chunk"]][1] + squares)
        else:
            chunks[piece["chunk"]] = (total, squares)
    total, squares = np.zeros(image_shape[0]), np.zeros(image_shape[0])
    for number in sorted(chunks):
        total += chunks[number][0]
        squares += chunks[number][1]
    return statistics_from_sums(total, squares, count, image_shape)


def write_indexes(data_dir) -> dict:
    """Check every shard, then write the index files, normalization.json and card.json; returns the card."""
    data_dir = Path(data_dir)
    plan = read_json(data_dir / PLAN)
    shards = {split: [(file, checked_shard(data_dir, file, count))
                      for file, count in zip(entry["files"], planned_counts(entry["count"], plan["images_per_shard"]))]
              for split, entry in plan["splits"].items()}
    first_file, first = shards["train"][0]
    image_shape = first["shape"]
    for split, entries in shards.items():
        for file, stats in entries:
            if stats["shape"] != image_shape:
                source = plan["sources"][RAW_SPLIT.get(split, split)]
                hint = ("config key dataset.unlabeled must give the same size and mode" if split == "unlabeled" else
                        "set config key dataset.image_folder.image_size to resize them to one size")
                raise DatasetFormatError(f"{source}: the images of shard {file} are {tuple(stats['shape'])} (C, H, W), "
                                         f"those of {first_file} {tuple(image_shape)}; {hint}")
    indexes = {split: {**INDEX_FORMAT, "shape": [plan["splits"][split]["count"], *image_shape],
                       "shards": [{"file": file, "count": stats["count"], "sha256": stats["sha256"]}
                                  for file, stats in entries]}
               for split, entries in shards.items()}
    statistics = combined_statistics([piece for _, stats in shards["train"] for piece in stats["chunk_sums"]],
                                     plan["splits"]["train"]["count"], image_shape)
    for split, index in indexes.items():
        write_json(data_dir / f"{split}_images.index.json", index)
    write_json(data_dir / "normalization.json", statistics)
    card = {**plan["card"], "image_shape": statistics["image_shape"],
            "normalization": {"mean": statistics["mean"], "std": statistics["std"], "computed_on": "train split only"},
            "shards": {"images_per_shard": plan["images_per_shard"],
                       "count": {split: len(entries) for split, entries in shards.items()}},
            "sha256": {**{f"{split}_labels.npy": file_digest(data_dir / f"{split}_labels.npy") for split in SPLITS},
                       **{f"{split}_images.index.json": file_digest(data_dir / f"{split}_images.index.json")
                          for split in SHARDED_SPLITS}}}
    write_json(data_dir / "card.json", card)
    log.info("wrote the index files of %s", ", ".join(f"{split} ({len(entries)} shards, {index['shape'][0]} images)"
                                                     for (split, entries), index in zip(shards.items(), indexes.values())))
    return card
