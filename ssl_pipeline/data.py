"""The dataset lives on the training device as uint8, and batches are cut from it there."""
from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.artifacts import read_json


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


def device_generator(device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@torch.no_grad()
def batched(function, images: torch.Tensor, batch_size: int):
    """Apply `function` to consecutive slices of `images` and concatenate the results."""
    return torch.cat([function(images[start:start + batch_size])
                      for start in range(0, len(images), batch_size)])
