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
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma. The weights are filled in where the images are:
    torch.tensor(LUMA, device=...) would copy them from the host, which waits for a GPU (a sync)."""
    weights = images.new_empty(1, 3, 1, 1)
    for channel, weight in enumerate(LUMA):
        weights[:, channel].fill_(weight)
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


def color_jitters(settings: dict) -> list:
    """color_jitter's four jitters in torchvision's order (brightness, contrast, saturation, hue), each
    (view (B, 3, H, W), draws (B,) uniform in [0, 1)) -> view."""
    def spread(draws, low, high):  # the arithmetic of uniform(): the factors it would give
        return draws * (high - low) + low

    def factor(draws, strength):
        return spread(draws, 1 - strength, 1 + strength).view(-1, 1, 1, 1)

    def brightness(view, draws):
        return (view * factor(draws, settings["brightness"])).clamp(0, 1)

    def contrast(view, draws):
        mean = grayscale(view).mean(dim=(1, 2, 3), keepdim=True)
        return ((view - mean) * factor(draws, settings["contrast"]) + mean).clamp(0, 1)

    def saturation(view, draws):
        gray = grayscale(view)
        return ((view - gray) * factor(draws, settings["saturation"]) + gray).clamp(0, 1)

    def hue(view, draws):
        hsv = rgb_to_hsv(view)
        shift = spread(draws, -settings["hue"], settings["hue"]).view(-1, 1, 1)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        return hsv_to_rgb(hsv)

    return [brightness, contrast, saturation, hue]


def color_jitter(images, settings: dict, generator, order_on_device=None):
    """SimCLR's colour jitter (Chen et al. 2020, Appendix A, "color distortion"), on RGB batches: with
    probability settings["probability"] per image, brightness, contrast and saturation are scaled by
    factors drawn from [1 - s, 1 + s] and the hue is rotated by up to settings["hue"] of the circle,
    as torchvision's ColorJitter does. torchvision applies the four in a random order per image; a
    batch here gets one random order, drawn per batch.

    The order is drawn on the generator's device. Following it from Python needs its values on the host,
    which on CUDA stalls the step until the GPU has caught up (a host-device sync). So where the order
    stays on the device (order_on_device; None: wherever the generator is not on the CPU), each of the
    four positions computes all four jitters and keeps the drawn one with torch.where: four times the
    jitter arithmetic, no sync. On the CPU reading the order costs nothing and the jitters run in it.
    Both ways draw the same random numbers in the same order (the order, one (B,) draw per position,
    then the choice of images) and give the same images bit for bit (tests/test_augment.py)."""
    batch, device = images.shape[0], images.device
    jitters = color_jitters(settings)
    order = torch.randperm(len(jitters), generator=generator, device=device)  # (4,)
    if order_on_device is None:
        order_on_device = generator.device.type != "cpu"
    host_order = None if order_on_device else order.tolist()
    jittered = images
    for position in range(len(jitters)):
        draws = torch.rand(batch, generator=generator, device=device)
        if order_on_device:
            candidates = [jitter(jittered, draws) for jitter in jitters]
            jittered = candidates[0]
            for index in range(1, len(jitters)):
                jittered = torch.where(order[position] == index, candidates[index], jittered)
        else:
            jittered = jitters[host_order[position]](jittered, draws)
    chosen = torch.rand(batch, generator=generator, device=device) < settings["probability"]
    return torch.where(chosen.view(batch, 1, 1, 1), jittered, images)


def random_grayscale(images, probability, generator):
    """SimCLR's random grayscale: a `probability` share of RGB images become grey (kept 3-channel)."""
    batch = images.shape[0]
    chosen = torch.rand(batch, generator=generator, device=images.device) < probability
    return torch.where(chosen.view(batch, 1, 1, 1), grayscale(images).expand_as(images), images)
