"""The self-supervised objectives: each loss on hand-made inputs with a known answer, the momentum
targets and queue, a few steps of each that lower its loss, and collapse detection."""
import copy
import math

import pytest
import torch

from ssl_pipeline.core.models import build_encoder
from ssl_pipeline.objectives import OBJECTIVES, build_objective, embedding_std, is_collapsed
from ssl_pipeline.objectives.barlow_twins import barlow_twins_loss, cross_correlation
from ssl_pipeline.objectives.byol import normalised_mse
from ssl_pipeline.objectives.common import cosine_momentum
from ssl_pipeline.objectives.moco_v2 import KeyQueue, info_nce
from ssl_pipeline.objectives.vicreg import covariance_term, variance_term, vicreg_loss

MODEL = {"widths": [8, 16], "convs_per_stage": 1, "pool_size": 2}
# Small heads of every objective, for tests.
SETTINGS = {
    "simclr": {"temperature": 0.5, "projection_hidden_dim": 32, "projection_dim": 16},
    "byol": {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32, "predictor": True,
             "base_momentum": 0.9},
    "vicreg": {"expander_dim": 32, "invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0},
    "barlow_twins": {"projection_dim": 32, "off_diagonal_weight": 0.005},
    "moco_v2": {"projection_hidden_dim": 32, "projection_dim": 16, "temperature": 0.2, "queue_size": 64,
                "momentum": 0.9, "bn_splits": 2},
}


def hadamard(n: int) -> torch.Tensor:
    """n x n matrix of +-1 with orthogonal columns (n a power of 2)."""
    matrix = torch.ones(1, 1)
    while len(matrix) < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix


def decorrelated_embeddings(n=16, d=8):
    """(n, d): every column zero-mean, unit variance (population), uncorrelated with every other."""
    return hadamard(n)[:, 1:d + 1]


# ---- losses on inputs with a known answer ---------------------------------------------------------

def test_perfectly_correlated_twins_give_barlow_twins_the_identity_and_zero_loss():
    z = decorrelated_embeddings()
    correlation = cross_correlation(z, 3 * z + 1)  # the same up to scale and shift: correlation 1
    torch.testing.assert_close(correlation, torch.eye(8))
    assert barlow_twins_loss(z, 3 * z + 1, off_diagonal_weight=0.005).item() == pytest.approx(0, abs=1e-6)


def test_barlow_twins_penalises_redundant_dimensions_by_lambda():
    z = decorrelated_embeddings()
    redundant = z.clone()
    redundant[:, 1] = redundant[:, 0]  # dimension 1 repeats dimension 0: C_01 = C_10 = 1
    loss = barlow_twins_loss(redundant, redundant, off_diagonal_weight=0.5)
    # BatchNorm's eps (1e-5) in the standardisation makes C = 1 / (1 + eps) for unit-variance columns.
    assert loss.item() == pytest.approx(0.5 * 2 / (1 + 1e-5) ** 2, abs=1e-6)


def test_identical_embeddings_give_vicreg_zero_invariance_and_decorrelated_ones_zero_regularisers():
    z = 2 * decorrelated_embeddings()  # std 2 > 1: no variance penalty
    assert vicreg_loss(z, z.clone(), 1.0, 0.0, 0.0).item() == 0.0
    assert variance_term(z).item() == 0.0
    assert covariance_term(z).item() == pytest.approx(0, abs=1e-6)
    collapsed = torch.zeros(16, 8)
    assert variance_term(collapsed).item() == pytest.approx(1 - math.sqrt(1e-4))
    # Both branches collapsed: the variance term is their mean, 1 - sqrt(eps) each.
    assert vicreg_loss(collapsed, collapsed, 25, 25, 1).item() == pytest.approx(25 * (1 - 0.01))


def test_byol_loss_is_zero_for_aligned_and_four_for_opposite_predictions():
    p = torch.randn(6, 5)
    assert normalised_mse(p, 3 * p).item() == pytest.approx(0, abs=1e-6)
    assert normalised_mse(p, -p).item() == pytest.approx(4, abs=1e-5)


def test_info_nce_is_low_when_the_positive_key_stands_out():
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    negatives = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    assert info_nce(queries, queries, negatives, 0.1) < info_nce(queries, -queries, negatives, 0.1)


# ---- momentum targets and the queue ---------------------------------------------------------------

def test_byol_target_follows_the_ema_formula_with_the_cosine_momentum_schedule():
    encoder = build_encoder(MODEL, 1)
    objective = build_objective("byol", encoder, SETTINGS["byol"])
    for parameter in encoder.parameters():
        parameter.data.add_(1.0)  # the online network moves away from its copy
    before = copy.deepcopy(objective.target_encoder.state_dict())
    objective.after_step(encoder, step=3, total_steps=10)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert tau == pytest.approx(cosine_momentum(0.9, 3, 10))
    for name, online in encoder.named_parameters():
        expected = tau * before[name] + (1 - tau) * online.detach()
        torch.testing.assert_close(objective.target_encoder.state_dict()[name], expected)
    assert cosine_momentum(0.9, 0, 10) == pytest.approx(0.9) and cosine_momentum(0.9, 10, 10) == 1.0


def test_targets_are_not_trained_and_start_equal_to_the_online_network():
    encoder = build_encoder(MODEL, 1)
    for name in ("byol", "moco_v2"):
        objective = build_objective(name, encoder, SETTINGS[name])
        trained = {id(p) for p in objective.parameters() if p.requires_grad}
        target = objective.target_encoder if name == "byol" else objective.key_encoder
        assert not any(id(p) in trained for p in target.parameters())
        for online, copied in zip(encoder.parameters(), target.parameters()):
            assert torch.equal(online, copied)


def test_moco_queue_enqueues_and_dequeues_in_order():
    queue = KeyQueue(size=5, dim=2)
    first, second = torch.arange(6.).reshape(3, 2), 10 + torch.arange(6.).reshape(3, 2)
    queue.enqueue(first)
    assert torch.equal(queue.keys[:3], first) and queue.position.item() == 3
    queue.enqueue(second)  # two keys fill the end, the third replaces the oldest
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[0], second[2])
    assert torch.equal(queue.keys[1:3], first[1:]) and queue.position.item() == 1
    queue.enqueue(torch.arange(14.).reshape(7, 2))  # larger than the queue: its last 5 keys remain
    assert sorted(queue.keys[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]


def test_moco_enqueues_the_keys_of_both_views_in_training_only():
    encoder = build_encoder(MODEL, 1)
    objective = build_objective("moco_v2", encoder, SETTINGS["moco_v2"])
    views = torch.rand(2 * 6, 1, 12, 12)
    objective.eval()(encoder(views), views)
    assert objective.queue.position.item() == 0
    objective.train()(encoder(views), views, torch.Generator().manual_seed(0))
    assert objective.queue.position.item() == 12


# ---- training ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["cnn", "resnet18"])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_a_few_steps_of_each_objective_lower_its_loss(name, backbone):
    """Every objective with every kind of backbone: the small CNN on grey images, ResNet-18 with its
    small-image stem on colour ones."""
    torch.manual_seed(0)
    model, channels = (MODEL, 1) if backbone == "cnn" else ({"architecture": backbone, "small_images": True}, 3)
    encoder = build_encoder(model, channels)
    objective = build_objective(name, encoder, SETTINGS[name])
    parameters = [p for module in (encoder, objective) for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    images = torch.rand(32, channels, 12, 12)
    views = torch.cat([images + 0.05 * torch.randn_like(images), images + 0.05 * torch.randn_like(images)])
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, 21):
        loss, _ = objective(encoder(views), views, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step(encoder, step, 20)
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_embedding_std_tells_collapse_from_spread():
    spread = torch.randn(256, 64)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64)
    assert embedding_std(spread).item() == pytest.approx(1 / 8, rel=0.1)
    assert not is_collapsed(embedding_std(spread).item(), 64)
    assert is_collapsed(embedding_std(collapsed).item(), 64)


@pytest.mark.parametrize("projection, tensors", [("mlp", 6), ("linear", 2), ("none", 0)])
def test_simclr_projection_head_is_an_mlp_a_linear_layer_or_none(projection, tensors):
    """SimCLR §4.2: the loss sees an MLP head's output (linear, BN, ReLU, linear: 6 parameter tensors),
    a linear head's (weight and bias), or the encoder's features themselves."""
    torch.manual_seed(0)
    encoder = build_encoder(MODEL, 1)
    objective = build_objective("simclr", encoder, {**SETTINGS["simclr"], "projection": projection})
    assert len(list(objective.parameters())) == tensors
    features = torch.randn(16, encoder.feature_dim)
    loss, embeddings = objective(features)
    width = encoder.feature_dim if projection == "none" else SETTINGS["simclr"]["projection_dim"]
    assert embeddings.shape == (16, width) and torch.isfinite(loss)
    if projection == "none":
        assert torch.equal(embeddings, features)
