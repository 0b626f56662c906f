import pytest
import torch

from ssl_pipeline.models import Classifier, Encoder, build_encoder
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
