"""The linear probe's solver on real features: the smoke run's pretrained encoder on the real
Fashion-MNIST. Its fit must converge and give the accuracy of scikit-learn's LogisticRegression on
the same objective (C = 1 / (N weight_decay), intercept not penalised) fitted 100x tighter."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ssl_pipeline.stages.evaluate import GRADIENT_TOLERANCE, ProbeData, fit_linear_classifier, whitening

CPU = {"device": "cpu", "require_gpu": False, "precision": "fp32", "threads": 2}
WEIGHT_DECAY = 1e-4


@pytest.fixture(scope="module")
def smoke_features(real_smoke_run):
    """Standardised features of the smoke run's SimCLR encoder: train (54,000) and test (10,000)."""
    workdir, _ = real_smoke_run
    data = ProbeData(workdir / "results" / "data", workdir / "results/pretrain/simclr/base/seed0/encoder.pt", CPU)
    with torch.no_grad():
        train, test = data.features(data.train_images).float(), data.features(data.test_images).float()
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return (train - mean) / std, data.train_labels, (test - mean) / std, data.test_labels, data.num_classes


@pytest.mark.workflow
def test_probe_converges_to_scikit_learns_accuracy_on_real_features(smoke_features):
    train, train_labels, test, test_labels, num_classes = smoke_features
    classifier, iterations, converged = fit_linear_classifier(train, train_labels, num_classes, WEIGHT_DECAY, 500)
    assert converged and iterations < 500
    with torch.no_grad():
        ours = (classifier(test).argmax(dim=1) == test_labels).float().mean().item()
    # 100x tighter than our test, in float64; one thread, as the other tests run beside it.
    with threadpool_limits(1):
        reference = LogisticRegression(C=1 / (len(train) * WEIGHT_DECAY), tol=GRADIENT_TOLERANCE / 100,
                                       max_iter=5000).fit(train.double().numpy(), train_labels.numpy())
    assert reference.n_iter_[0] < 5000
    theirs = float((reference.predict(test.double().numpy()) == test_labels.numpy()).mean())
    assert abs(ours - theirs) <= 0.001, (ours, theirs)
    # Near the same minimum, not only at the same accuracy: the objective within 0.1 % of the reference's
    # (scikit-learn's default tolerance, ours, leaves about 0.04 % on these features).
    def objective(weight, bias):
        logits = train.double() @ weight.T + bias
        cross_entropy = torch.nn.functional.cross_entropy(logits, train_labels)
        return (cross_entropy + WEIGHT_DECAY / 2 * weight.square().sum()).item()

    minimum = objective(torch.from_numpy(reference.coef_), torch.from_numpy(reference.intercept_))
    reached = objective(classifier.weight.detach().double(), classifier.bias.detach().double())
    assert minimum <= reached <= minimum * (1 + 1e-3), (reached, minimum)

def test_whitening_gives_features_an_identity_second_moment_and_keeps_the_logits():
    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    mixing = torch.diag(torch.logspace(-1, 1, 16)) @ rotation  # correlated features, scales 0.1 to 10
    features = torch.randn(4000, 16, generator=generator) @ mixing
    factor, inverse = whitening(features, 0.0)
    whitened = features.double() @ inverse.T
    second_moment = whitened.T @ whitened / len(features)
    torch.testing.assert_close(second_moment, torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)  # the ridge's share
    # W = V L^-1 on x gives the logits V on z: the reparametrisation keeps the model.
    v = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(features.double() @ (v @ inverse).T, whitened @ v.T)
    torch.testing.assert_close(factor @ inverse, torch.eye(16, dtype=torch.float64))


def test_a_dead_feature_does_not_break_the_fit_even_without_a_penalty():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(50)
    features = torch.randn(150, 4, generator=generator) + torch.nn.functional.one_hot(labels, 4).float() * 3
    features[:, 3] = 0  # a dimension the encoder never uses
    classifier, _, converged = fit_linear_classifier(features, labels, 3, 0.0, 500)
    assert torch.isfinite(classifier.weight).all() and converged
    assert (classifier(features).argmax(dim=1) == labels).float().mean() > 0.95
