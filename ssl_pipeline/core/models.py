"""The classifier put on top of an encoder (ssl_pipeline/backbones/) for fine-tuning."""
import torch
from torch import nn

from ssl_pipeline.backbones import build_encoder, describe_encoder, encoder_card
from ssl_pipeline.backbones.cnn import Encoder


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            # A linear probe must not update BatchNorm running statistics either.
            self.encoder.eval()
        return self

    def forward(self, images):  # (B, C, H, W) -> (B, num_classes) logits
        return self.head(self.encoder(images))


def prepare(module: nn.Module, device) -> nn.Module:
    return module.to(device=device, memory_format=torch.channels_last)


__all__ = ["Classifier", "Encoder", "build_encoder", "describe_encoder", "encoder_card", "prepare"]
