"""The dataset as uint8 tensors, normalised on the device, and the order of its batches. Where the images
live (the device, the host or the disk: config data.residency) is ssl_pipeline/core/residency.py."""
from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.core.artifacts import read_json


def load_array(path, device, dtype=None) -> torch.Tensor:
    tensor = torch.from_numpy(np.load(Path(path)))
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


def load_labels(path, device) -> torch.Tensor:
    return load_array(path, device, dtype=torch.int64)


class Normalizer:
    """uint8 (B, C, H, W) -> float (B, C, H, W) in [0, 1], and [0, 1] -> standardised."""

    def __init__(self, stats: dict, device):
        """stats: {"mean", "std", "image_shape"}, as preprocess.normalization_statistics gives them."""
        self.mean = torch.tensor(stats["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(stats["std"], device=device).view(1, -1, 1, 1)
        self.image_shape = tuple(stats["image_shape"])

    @classmethod
    def load(cls, normalization_path, device) -> "Normalizer":
        return cls(read_json(normalization_path), device)

    @staticmethod
    def to_unit(batch: torch.Tensor) -> torch.Tensor:
        return batch.float().div_(255.0)

    def standardise(self, unit: torch.Tensor) -> torch.Tensor:
        return ((unit - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.standardise(self.to_unit(batch))


def shuffled_batches(num_items: int, batch_size: int, generator: torch.Generator, device):
    """Yield index tensors of one epoch; the last short batch is dropped so every step has the
    same shape (which keeps BatchNorm statistics and cudnn autotuning stable). Datasets smaller
    than one batch give a single batch of everything."""
    order = torch.randperm(num_items, generator=generator, device=device)
    batch_size = min(batch_size, num_items)
    for start in range(0, num_items - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


class BatchOrder:
    """The batches of shuffled_batches, epoch after epoch, as a position that a resume file can
    save and restore: the current epoch's permutation and how many of its batches were taken. A new
    permutation is drawn when the first batch of an epoch is asked for, as shuffled_batches does."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator, device):
        self.num_items, self.generator, self.device = num_items, generator, device
        self.batch_size = min(batch_size, num_items)
        self.steps_per_epoch = num_items // self.batch_size
        self.order = None  # (num_items,) int64 on the device
        self.taken = self.steps_per_epoch

    def next_batch(self) -> torch.Tensor:
        if self.taken == self.steps_per_epoch:
            self.order = torch.randperm(self.num_items, generator=self.generator, device=self.device)
            self.taken = 0
        start = self.taken * self.batch_size
        self.taken += 1
        return self.order[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"order": None if self.order is None else self.order.cpu(), "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.order = None if state["order"] is None else state["order"].to(self.device)
        self.taken = state["taken"]


def device_generator(device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def chunks_of(images, size: int):
    """Consecutive slices of `images` on the device: a tensor, or an ImageData (ssl_pipeline/core/residency.py),
    which reads them from where the images live."""
    if isinstance(images, torch.Tensor):
        return (images[start:start + size] for start in range(0, len(images), size))
    return images.chunks(size)


@torch.no_grad()
def batched(function, images, batch_size: int):
    """Apply `function` to consecutive slices of `images` (a tensor or an ImageData) and concatenate the
    results."""
    return torch.cat([function(chunk) for chunk in chunks_of(images, batch_size)])
