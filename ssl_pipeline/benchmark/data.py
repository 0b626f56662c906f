"""Config, the measured plan and the raw data of the benchmark."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_pipeline.core.config import load_config as config_with_overrides
from ssl_pipeline.datasets import format_options, read_dataset
from ssl_pipeline.datasets.idx import load_split as read_split


REPO = Path(__file__).resolve().parent.parent.parent
BASE_CONFIG = REPO / "config" / "config.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DOWNLOADED = REPO / "results" / "raw"  # where the pipeline's download rule puts the IDX files
STAGES = ("pretrain", "finetune")
# lightly: the peer library's recipe (peer.py), pretraining only.
IMPLEMENTATIONS = ("ours", "reference", "lightly")
MIB = 2 ** 20
SEED = 0
# Speed does not depend on the learning rate; a schedule this long keeps it at its peak while we time.
CONSTANT_SCHEDULE_STEPS = 10 ** 6
RSS_SAMPLE_SECONDS = 0.05


@dataclass(frozen=True)
class Plan:
    """How much to measure. images: training images used (None: all); batch_size: None keeps the config's."""
    repetitions: int = 3
    warmup_steps: int = 4
    repetition_seconds: float = 5.0  # each timed repetition runs about this long...
    min_steps: int = 3  # ...and at least this many steps
    images: int = None
    batch_size: int = None
    roof_seconds: float = 2.0  # timing of each roof operation (ssl_pipeline/core/roofline.py)


TINY = Plan(repetitions=3, warmup_steps=2, repetition_seconds=0.1, min_steps=2, images=512, batch_size=32,
            roof_seconds=0.1)


# ---------------------------------------------------------------------------------------------------
# Config and data
# ---------------------------------------------------------------------------------------------------

def load_config(override_paths=()) -> dict:
    return config_with_overrides(BASE_CONFIG, override_paths, SCHEMA)


def default_raw_dir(config: dict) -> Path:
    """The pipeline's downloaded files if present, else the first local-directory mirror that has them."""
    dataset = config["dataset"]
    name = dataset["files"]["train_images"]["name"] if dataset["format"] == "idx" else dataset["archive"]["name"]
    for directory in [DOWNLOADED] + [Path(mirror) for mirror in config["dataset"]["mirrors"]]:
        if any((directory / candidate).is_file() for candidate in (name, name + ".gz")):
            return directory
    raise FileNotFoundError(f"no {name}[.gz] in {DOWNLOADED} or in a local mirror of config key "
                            "dataset.mirrors; run the pipeline's download step or pass --raw-dir")


def raw_path(directory: Path, name: str) -> Path:
    """An IDX file as a mirror holds it: `<name>.gz` or `<name>`."""
    compressed = directory / f"{name}.gz"
    return compressed if compressed.is_file() else directory / name


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


def load_split(raw_dir, config: dict, split: str, limit=None) -> Split:
    """One split of the raw data: IDX files as a mirror holds them, or any other format's archive."""
    dataset = config["dataset"]
    if dataset["format"] == "idx":
        files = dataset["files"]
        images, labels = read_split(raw_path(Path(raw_dir), files[f"{split}_images"]["name"]),
                                    raw_path(Path(raw_dir), files[f"{split}_labels"]["name"]))
    else:
        data = read_dataset(dataset["format"], {"archive": Path(raw_dir) / dataset["archive"]["name"]},
                            format_options(dataset))
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    return Split(np.ascontiguousarray(images[:limit]), labels[:limit].astype(np.int64))


def endless(make_iterable):
    while True:
        yield from make_iterable()
