import pytest
import torch

from ssl_pipeline.core.models import Classifier, Encoder, build_encoder, describe_encoder, encoder_card
from ssl_pipeline.objectives import SimCLR, nt_xent

SIMCLR = {"temperature": 0.5, "projection_hidden_dim": 32, "projection_dim": 16}


@pytest.mark.parametrize("channels, size, widths, pool, features", [
    (1, 28, (8, 16, 32), 1, 32),
    (3, 32, (8, 16), 2, 64),
    (1, 12, (4, 8, 16), 2, 64),
])
def test_encoder_output_shape_follows_the_config(channels, size, widths, pool, features):
    encoder = Encoder(channels, widths, convs_per_stage=2, pool_size=pool)
    assert encoder.feature_dim == features
    assert encoder(torch.rand(5, channels, size, size)).shape == (5, features)


def test_build_encoder_reads_the_model_section():
    encoder = build_encoder({"widths": [4, 8], "convs_per_stage": 3, "pool_size": 1}, in_channels=1)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and encoder.feature_dim == 8


RESNET18_SMALL = {"architecture": "resnet18", "small_images": True}


@pytest.mark.parametrize("architecture, small_images, channels, features", [
    ("resnet18", True, 3, 512), ("resnet18", False, 1, 512), ("resnet50", True, 1, 2048)])
def test_resnets_lose_their_classifier_and_take_any_channel_count(architecture, small_images, channels, features):
    encoder = build_encoder({"architecture": architecture, "small_images": small_images}, channels)
    stem = encoder.network.conv1
    assert stem.in_channels == channels
    assert (stem.kernel_size, stem.stride) == (((3, 3), (1, 1)) if small_images else ((7, 7), (2, 2)))
    assert isinstance(encoder.network.maxpool, torch.nn.Identity) == small_images
    assert isinstance(encoder.network.fc, torch.nn.Identity) and encoder.feature_dim == features
    assert encoder(torch.rand(2, channels, 32, 32)).shape == (2, features)


def test_small_image_stem_keeps_the_resolution_the_imagenet_stem_divides_by_four():
    shapes = {}
    for small in (True, False):
        network = build_encoder({"architecture": "resnet18", "small_images": small}, 3).network
        stem = torch.nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
        shapes[small] = stem(torch.rand(1, 3, 32, 32)).shape[-2:]
    assert shapes == {True: (32, 32), False: (8, 8)}


@pytest.mark.parametrize("settings", [{"widths": [8, 16], "convs_per_stage": 1, "pool_size": 2}, RESNET18_SMALL])
def test_encoders_train_in_channels_last_and_bf16_autocast(settings):
    encoder = build_encoder(settings, 3).to(memory_format=torch.channels_last)
    images = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = encoder(images)
    assert features.dtype == torch.bfloat16 and features.shape == (4, encoder.feature_dim)
    features.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_encoder_card_counts_parameters_features_and_forward_flops():
    encoder = build_encoder({"widths": [4], "convs_per_stage": 1, "pool_size": 1}, 1)
    card = encoder_card(encoder.train(), {"widths": [4], "convs_per_stage": 1, "pool_size": 1}, (1, 8, 8))
    # One 3x3 convolution 1 -> 4 channels at 8x8: 2 * 4 * 9 * 64 multiply-adds; BN, ReLU and pooling
    # are not FLOPs in this count.
    assert card == {"architecture": "cnn", "small_images": False, "parameters": 4 * 9 + 2 * 4, "feature_dim": 4,
                    "image_shape": [1, 8, 8], "forward_flops_per_image": 2 * 4 * 9 * 64}
    assert encoder.training  # counted in eval mode, given back as it was
    assert describe_encoder(card) == "cnn: 44 parameters, 4 features, 4.61 kFLOP per 1x8x8 image (forward)"
    resnet = encoder_card(build_encoder(RESNET18_SMALL, 3), RESNET18_SMALL, (3, 32, 32))
    assert resnet["parameters"] == 11_168_832 and resnet["feature_dim"] == 512
    assert 1.0e9 < resnet["forward_flops_per_image"] < 1.2e9  # ResNet-18 on CIFAR: ~0.56 G multiply-adds


def test_an_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="model.architecture is 'vgg'; known: cnn, resnet18, resnet50"):
        build_encoder({"architecture": "vgg"}, 3)


def test_classifier_gives_one_logit_per_class():
    model = Classifier(Encoder(1, (4, 8)), num_classes=7)
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 7)


def test_linear_probe_trains_only_the_head_and_freezes_batchnorm_statistics():
    model = Classifier(Encoder(1, (4, 8)), num_classes=3, freeze_encoder=True).train()
    running_mean = model.encoder.features[0][1].running_mean.clone()
    model(torch.rand(8, 1, 12, 12)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None
    torch.testing.assert_close(model.encoder.features[0][1].running_mean, running_mean)


def reference_nt_xent(z1, z2, temperature):
    """The NT-Xent loss written out pair by pair, as in the SimCLR paper."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z)
    total = 0.0
    for i in range(n):
        j = (i + n // 2) % n
        numerator = torch.exp(z[i] @ z[j] / temperature)
        denominator = sum(torch.exp(z[i] @ z[k] / temperature) for k in range(n) if k != i)
        total += -torch.log(numerator / denominator)
    return total / n


def test_nt_xent_matches_the_pairwise_definition():
    z1, z2 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.randn(6, 5)
    torch.testing.assert_close(nt_xent(z1, z2, 0.3), reference_nt_xent(z1, z2, 0.3))


def test_nt_xent_is_lower_when_views_agree():
    z = torch.randn(16, 8)
    assert nt_xent(z, z + 0.01 * torch.randn(16, 8), 0.2) < nt_xent(z, torch.randn(16, 8), 0.2)


def test_simclr_head_turns_features_into_a_scalar_loss():
    objective = SimCLR(Encoder(1, (4, 12)), settings=SIMCLR)
    loss, embeddings = objective(torch.randn(20, 12))
    assert embeddings.shape == (20, SIMCLR["projection_dim"])
    assert loss.shape == () and loss.requires_grad
