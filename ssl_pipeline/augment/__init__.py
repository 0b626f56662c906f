"""Augmentations applied to whole batches on the training device (no per-sample PIL).

All functions take and return float images in [0, 1], shape (B, C, H, W), and draw their randomness
from an explicit generator so runs are reproducible. geometric.py moves pixels, photometric.py changes
their values; a view below composes them as the config says. The next augmentation goes into one of
the two modules and into the view that uses it, with its config key and schema entry.
"""
from ssl_pipeline.augment.geometric import random_resized_crop_flip, random_translate_flip, uniform
from ssl_pipeline.augment.photometric import (color_jitter, grayscale, hsv_to_rgb, random_brightness_contrast,
                                              random_erase, random_grayscale, rgb_to_hsv)

COLOR_CHANNELS = 3


def contrastive_view(images, settings: dict, generator):
    """One SimCLR view. settings: the config's pretrain.augment section."""
    view = random_resized_crop_flip(images, settings["crop_scale"], settings["crop_ratio"],
                                    settings["flip"], generator)
    if settings["brightness_contrast"] > 0:
        view = random_brightness_contrast(view, settings["brightness_contrast"], generator)
    if view.shape[1] == COLOR_CHANNELS:  # colour distortion only exists for colour images
        jitter = settings.get("color_jitter")
        if jitter and jitter["probability"] > 0:
            view = color_jitter(view, jitter, generator)
        if settings.get("grayscale_probability", 0) > 0:
            view = random_grayscale(view, settings["grayscale_probability"], generator)
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


__all__ = ["COLOR_CHANNELS", "color_jitter", "contrastive_view", "grayscale", "hsv_to_rgb", "random_brightness_contrast",
           "random_erase", "random_grayscale", "random_resized_crop_flip", "random_translate_flip", "rgb_to_hsv",
           "supervised_view", "uniform"]
