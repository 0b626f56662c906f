"""Encoders (backbones), chosen by config model.architecture. An encoder maps images (B, C, H, W) to
features (B, feature_dim) and says its feature_dim. To add one: write its module with a
build(model_settings, in_channels), add it to BACKBONES, and give its settings to config/config.yaml and
the schema."""
import torch

from ssl_pipeline.backbones import cnn, resnet
from ssl_pipeline.core.roofline import count_flops, describe_flops

BACKBONES = {"cnn": cnn.build, "resnet18": resnet.build, "resnet50": resnet.build}


def build_encoder(model_settings: dict, in_channels: int) -> torch.nn.Module:
    """model_settings: the config's `model` section (architecture cnn when it names none)."""
    architecture = model_settings.get("architecture", "cnn")
    if architecture not in BACKBONES:
        raise ValueError(f"config key model.architecture is {architecture!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[architecture]({**model_settings, "architecture": architecture}, in_channels)


def encoder_card(encoder: torch.nn.Module, model_settings: dict, image_shape) -> dict:
    """What the log and the checkpoint say about an encoder: architecture, parameters, feature dimension
    and forward FLOPs per image of `image_shape` (C, H, W), counted on one image in eval mode."""
    was_training = encoder.training
    parameter = next(encoder.parameters())
    image = torch.zeros(1, *image_shape, device=parameter.device)
    encoder.eval()
    with torch.no_grad():
        flops = count_flops(lambda: encoder(image))
    encoder.train(was_training)
    return {"architecture": model_settings.get("architecture", "cnn"),
            "small_images": model_settings.get("small_images", False),
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "feature_dim": encoder.feature_dim,
            "image_shape": list(image_shape),
            "forward_flops_per_image": flops}


def describe_encoder(card: dict) -> str:
    """encoder_card as one line of a job's log."""
    stem = " (small-image stem)" if card["small_images"] and card["architecture"] != "cnn" else ""
    shape = "x".join(map(str, card["image_shape"]))
    return (f"{card['architecture']}{stem}: {card['parameters']:,} parameters, {card['feature_dim']} features, "
            f"{describe_flops(card['forward_flops_per_image'])} per {shape} image (forward)")


__all__ = ["BACKBONES", "build_encoder", "describe_encoder", "encoder_card"]
