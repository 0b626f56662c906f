"""The usual PyTorch recipe, as tutorials write it: a `Dataset` that turns each image into a PIL image and
runs torchvision transforms on it, one sample at a time, and a `DataLoader` that batches the samples
in worker processes. The benchmark times it against our pipeline on the same model, loss, batch size,
device and thread count.

The transforms follow our batched augmentations (ssl_pipeline/augment/) as closely as torchvision
allows; where they differ, the comment says how. Loader settings follow the PyTorch performance tuning
guide: worker processes with persistent_workers, pinned memory and non-blocking copies on CUDA only,
and channels_last inputs for a CNN.
"""
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


class TutorialDataset(Dataset):
    """What torchvision.datasets.FashionMNIST does per item: array -> PIL image -> transform.
    images: uint8 numpy (N, C, H, W) with C 1 or 3; labels: int numpy (N,), or None (pretraining)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        pixels = self.images[index]  # (C, H, W)
        image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        label = -1 if self.labels is None else int(self.labels[index])
        return self.transform(image), label


class TwoViews:
    """SimCLR tutorials' wrapper: two independent draws of the same transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def contrastive_transform(augment: dict, mean, std, size, channels: int = 1) -> T.Compose:
    """One view, like augment.contrastive_view. augment: config `pretrain.augment`.
    Differences: torchvision resamples the crop with antialiased bilinear interpolation (ours samples
    bilinearly without antialiasing), ColorJitter scales brightness by a factor where ours adds an
    offset (the ranges are the same), and it orders the colour jitters at random per image, ours per
    batch."""
    steps = [T.RandomResizedCrop(size, scale=tuple(augment["crop_scale"]), ratio=tuple(augment["crop_ratio"]))]
    if augment["flip"]:
        steps.append(T.RandomHorizontalFlip())
    if augment["brightness_contrast"] > 0:
        steps.append(T.ColorJitter(brightness=augment["brightness_contrast"],
                                   contrast=augment["brightness_contrast"]))
    if channels == 3:  # SimCLR's colour distortion, as ours applies it to colour images only
        jitter = augment["color_jitter"]
        steps.append(T.RandomApply([T.ColorJitter(jitter["brightness"], jitter["contrast"], jitter["saturation"],
                                                  jitter["hue"])], p=jitter["probability"]))
        steps.append(T.RandomGrayscale(p=augment["grayscale_probability"]))
    return T.Compose(steps + to_normalized_tensor(augment, mean, std))


def to_normalized_tensor(augment: dict, mean, std) -> list:
    """PIL image -> tensor, random erasing if asked for, normalisation."""
    steps = [T.ToTensor()]
    if augment["erase_probability"] > 0:
        # Before Normalize, so the box is black (0) as in ours; same area and aspect ranges.
        steps.append(T.RandomErasing(p=augment["erase_probability"], scale=(0.02, 0.25), ratio=(0.3, 3.3),
                                     value=0))
    return steps + [T.Normalize(mean, std)]


def supervised_transform(augment: dict, mean, std, size) -> T.Compose:
    """Like augment.supervised_view: translation by up to max_shift pixels with zero padding, flip.
    augment: config `finetune.augment`."""
    steps = []
    if augment["max_shift"] > 0:
        steps.append(T.RandomCrop(size, padding=augment["max_shift"]))
    if augment["flip"]:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + to_normalized_tensor(augment, mean, std))


def data_loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Shuffled batches, the last short one dropped as ours does. Tuning guide settings: workers keep
    running between epochs, and pinned host memory only where there is a GPU to copy to."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def to_device(batch: torch.Tensor, device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def contrastive_loss(encoder, objective, views, runtime):
    """views: the loader's two standardised views, each (B, C, H, W) -> the objective's loss."""
    inputs = to_device(torch.cat(views), runtime.device)  # (2B, C, H, W)
    with runtime.autocast():
        features = encoder(inputs)  # (2B, F)
        return objective(features, inputs)[0]


def supervised_loss(model, images, labels, label_smoothing: float, runtime):
    """images: a standardised batch (B, C, H, W) from the loader; labels (B,)."""
    inputs = to_device(images, runtime.device)
    labels = labels.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        return F.cross_entropy(model(inputs), labels, label_smoothing=label_smoothing)
