"""The project's own small CNN (config model.architecture: cnn), sized for 28x28 images on a CPU."""
import torch
from torch import nn


def conv_bn_relu(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """A small VGG-style CNN: per stage `convs_per_stage` 3x3 conv-BN-ReLU layers, 2x2 max-pool between
    stages, and average pooling to a `pool_size` x `pool_size` grid at the end (1 is global average
    pooling; 2 keeps the coarse layout, which centred datasets like Fashion-MNIST reward).
    Works for any input size: (B, C, H, W) -> (B, widths[-1] * pool_size**2)."""

    def __init__(self, in_channels: int, widths=(32, 64, 128), convs_per_stage: int = 1, pool_size: int = 1):
        super().__init__()
        layers, channels = [], in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers.append(conv_bn_relu(channels, width))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.feature_dim = channels * pool_size ** 2

    def forward(self, images):  # (B, C, H, W) -> (B, feature_dim)
        return torch.flatten(self.pool(self.features(images)), 1)


def build(model_settings: dict, in_channels: int) -> Encoder:
    return Encoder(in_channels, tuple(model_settings["widths"]), model_settings["convs_per_stage"],
                   model_settings["pool_size"])
