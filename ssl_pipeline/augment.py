"""Augmentations applied to whole batches on the training device (no per-sample PIL).

All functions take and return float images in [0, 1], shape (B, C, H, W), and draw their randomness
from an explicit generator so runs are reproducible.
"""
import math

import torch
import torch.nn.functional as F


def uniform(low, high, size, generator, device):
    return torch.rand(size, generator=generator, device=device) * (high - low) + low


def random_resized_crop_flip(images, scale, ratio, flip, generator):
    """One affine warp per image: crop a random box of `scale` x area with aspect in `ratio`, resize it
    back to full size, and mirror it horizontally with probability 1/2 if `flip`."""
    batch, device = images.shape[0], images.device
    area = uniform(scale[0], scale[1], batch, generator, device)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]), batch, generator, device)
    aspect = torch.exp(log_ratio)
    # Box width and height as fractions of the image side (affine_grid works in [-1, 1] coordinates).
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = uniform(-1.0, 1.0, batch, generator, device) * (1.0 - width)
    centre_y = uniform(-1.0, 1.0, batch, generator, device) * (1.0 - height)
    mirror = torch.ones(batch, device=device)
    if flip:
        mirror = torch.where(torch.rand(batch, generator=generator, device=device) < 0.5, -mirror, mirror)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_translate_flip(images, max_shift, flip, generator):
    """Shift by up to `max_shift` pixels (zero padding) and mirror with probability 1/2 if `flip`."""
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator, device=device)
    rows = torch.arange(height, device=device).view(1, height, 1) + shifts[0].view(batch, 1, 1)
    cols = torch.arange(width, device=device).view(1, 1, width) + shifts[1].view(batch, 1, 1)
    if flip:
        mirrored = torch.rand(batch, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored.view(batch, 1, 1), cols.flip(-1), cols)
    batch_index = torch.arange(batch, device=device).view(batch, 1, 1)
    # Gather (B, H, W) pixel positions from every channel: result (B, H, W, C) -> (B, C, H, W).
    return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)


def random_brightness_contrast(images, strength, generator):
    """Scale contrast around each image's mean and shift brightness, both by up to `strength`."""
    batch, device = images.shape[0], images.device
    contrast = uniform(1 - strength, 1 + strength, batch, generator, device).view(batch, 1, 1, 1)
    brightness = uniform(-strength, strength, batch, generator, device).view(batch, 1, 1, 1) * 0.5
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


def random_erase(images, probability, max_area, generator):
    """Blank one random rectangle (up to `max_area` of the image) in a `probability` share of images."""
    batch, _, height, width = images.shape
    device = images.device
    area = uniform(0.02, max_area, batch, generator, device)
    aspect = torch.exp(uniform(math.log(0.3), math.log(3.3), batch, generator, device))
    box_h = (torch.sqrt(area / aspect) * height).clamp(1, height)
    box_w = (torch.sqrt(area * aspect) * width).clamp(1, width)
    top = uniform(0, 1, batch, generator, device) * (height - box_h)
    left = uniform(0, 1, batch, generator, device) * (width - box_w)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
    chosen = torch.rand(batch, generator=generator, device=device) < probability
    mask = (inside & chosen.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
    return images.masked_fill(mask, 0.0)


def contrastive_view(images, settings: dict, generator):
    """One SimCLR view. settings: the config's pretrain.augment section."""
    view = random_resized_crop_flip(images, settings["crop_scale"], settings["crop_ratio"],
                                    settings["flip"], generator)
    if settings["brightness_contrast"] > 0:
        view = random_brightness_contrast(view, settings["brightness_contrast"], generator)
    if settings["erase_probability"] > 0:
        view = random_erase(view, settings["erase_probability"], 0.25, generator)
    return view


def supervised_view(images, settings: dict, generator):
    """Light augmentation for fine-tuning. settings: the config's finetune.augment section."""
    view = images
    if settings["max_shift"] > 0 or settings["flip"]:
        view = random_translate_flip(view, settings["max_shift"], settings["flip"], generator)
    if settings["erase_probability"] > 0:
        view = random_erase(view, settings["erase_probability"], 0.25, generator)
    return view
