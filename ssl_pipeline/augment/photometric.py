"""Photometric augmentations of whole batches: brightness and contrast, SimCLR's colour distortion
(colour jitter and random grayscale), random erasing."""
import math

import torch

from ssl_pipeline.augment.geometric import uniform

# ITU-R BT.601 luma weights: what torchvision's rgb_to_grayscale (and PIL's "L" mode) use.
LUMA = (0.299, 0.587, 0.114)


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


def grayscale(images):
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def rgb_to_hsv(images):
    """(B, 3, H, W) RGB in [0, 1] -> hue, saturation, value in [0, 1] (hue as a share of the circle)."""
    red, green, blue = images.unbind(1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == red, ((green - blue) / safe) % 6,
                      torch.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(images):
    hue, saturation, value = images.unbind(1)
    sector = hue * 6
    channel = torch.stack([(5 + sector) % 6, (3 + sector) % 6, (1 + sector) % 6], dim=1)  # r, g, b
    weight = (torch.minimum(channel, 4 - channel)).clamp(0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * weight)


def color_jitter(images, settings: dict, generator):
    """SimCLR's colour jitter (Chen et al. 2020, Appendix A, "color distortion"), on RGB batches: with
    probability settings["probability"] per image, brightness, contrast and saturation are scaled by
    factors drawn from [1 - s, 1 + s] and the hue is rotated by up to settings["hue"] of the circle,
    as torchvision's ColorJitter does. torchvision applies the four in a random order per image; a
    batch here gets one random order, drawn per batch."""
    batch, device = images.shape[0], images.device

    def factor(strength):
        return uniform(1 - strength, 1 + strength, batch, generator, device).view(batch, 1, 1, 1)

    def brightness(view):
        return (view * factor(settings["brightness"])).clamp(0, 1)

    def contrast(view):
        mean = grayscale(view).mean(dim=(1, 2, 3), keepdim=True)
        return ((view - mean) * factor(settings["contrast"]) + mean).clamp(0, 1)

    def saturation(view):
        gray = grayscale(view)
        return ((view - gray) * factor(settings["saturation"]) + gray).clamp(0, 1)

    def hue(view):
        hsv = rgb_to_hsv(view)
        shift = uniform(-settings["hue"], settings["hue"], batch, generator, device).view(batch, 1, 1)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        return hsv_to_rgb(hsv)

    jitters = [brightness, contrast, saturation, hue]
    jittered = images
    for index in torch.randperm(len(jitters), generator=generator, device=device).tolist():
        jittered = jitters[index](jittered)
    chosen = torch.rand(batch, generator=generator, device=device) < settings["probability"]
    return torch.where(chosen.view(batch, 1, 1, 1), jittered, images)


def random_grayscale(images, probability, generator):
    """SimCLR's random grayscale: a `probability` share of RGB images become grey (kept 3-channel)."""
    batch = images.shape[0]
    chosen = torch.rand(batch, generator=generator, device=images.device) < probability
    return torch.where(chosen.view(batch, 1, 1, 1), grayscale(images).expand_as(images), images)
