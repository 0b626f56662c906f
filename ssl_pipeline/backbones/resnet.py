"""torchvision's ResNet-18 and ResNet-50 (He et al. 2016, "Deep Residual Learning for Image
Recognition", Table 1) as encoders: the classification layer is dropped, so the encoder ends at the
global average pool (512 and 2048 features).

model.small_images swaps the ImageNet stem (7x7 stride-2 convolution, then a 3x3 stride-2 max-pool,
which shrink a 32x32 image to 8x8 before the first block) for one 3x3 stride-1 convolution without the
max-pool, as the CIFAR experiments of SimCLR (Chen et al. 2020, Appendix B.9) and solo-learn do. Weights
start from torchvision's default initialisation; nothing is downloaded.
"""
import torch
import torchvision
from torch import nn

ARCHITECTURES = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
STEM_WIDTH = 64  # channels of every torchvision ResNet's first convolution


class ResNetEncoder(nn.Module):
    def __init__(self, architecture: str, in_channels: int, small_images: bool):
        super().__init__()
        network = ARCHITECTURES[architecture](weights=None)
        if small_images:
            network.conv1 = nn.Conv2d(in_channels, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
            network.maxpool = nn.Identity()
        elif in_channels != 3:
            network.conv1 = nn.Conv2d(in_channels, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
        if small_images or in_channels != 3:
            nn.init.kaiming_normal_(network.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        self.feature_dim = network.fc.in_features
        network.fc = nn.Identity()
        self.network = network

    def forward(self, images):  # (B, C, H, W) -> (B, feature_dim)
        return torch.flatten(self.network(images), 1)


def build(model_settings: dict, in_channels: int) -> ResNetEncoder:
    return ResNetEncoder(model_settings["architecture"], in_channels, model_settings.get("small_images", False))
