"""Geometric augmentations of whole batches: random resized crop, translation, flip."""
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
