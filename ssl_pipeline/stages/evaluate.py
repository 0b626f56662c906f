"""Test-set metrics of fine-tuned models, and the kNN probe of the pretrained encoder."""
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ssl_pipeline.core.artifacts import read_json, write_json
from ssl_pipeline.core.arrays import split_images_path
from ssl_pipeline.core.data import Normalizer, batched, load_labels
from ssl_pipeline.core.inference import INFERENCE_BATCH, embed, predict
from ssl_pipeline.core.models import Classifier, build_encoder, prepare
from ssl_pipeline.core.residency import job_images
from ssl_pipeline.core.runtime import setup_runtime
from ssl_pipeline.core.training import load_checkpoint, pretraining_identity

log = logging.getLogger(__name__)
KNN_QUERY_CHUNK = 1024


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes, num_classes).cpu().numpy()


def classification_metrics(labels, predictions, num_classes) -> dict:
    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "accuracy": float(matrix.trace() / matrix.sum()),
        "per_class_accuracy": [round(float(a), 5) for a in per_class],
        "confusion_matrix": matrix.tolist(),
    }


def knn_predict(train_features, train_labels, query_features, num_classes, k, temperature):
    """Weighted kNN on cosine similarity, as in the standard self-supervised kNN probe
    (Wu et al. 2018): each of the k nearest neighbours votes for its class with exp(sim / T)."""
    train = F.normalize(train_features, dim=1)
    predictions = []
    for start in range(0, len(query_features), KNN_QUERY_CHUNK):
        query = F.normalize(query_features[start:start + KNN_QUERY_CHUNK], dim=1)
        similarity, neighbour = (query @ train.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[neighbour], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def load_classifier(checkpoint: dict) -> Classifier:
    encoder = build_encoder(checkpoint["config"]["model"], checkpoint["in_channels"])
    model = Classifier(encoder, checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model


def evaluate_classifier(data_dir, model_path, metrics_path, compute: dict, residency=None) -> dict:
    """Test accuracy, per-class accuracy and confusion matrix of one fine-tuned model. residency: config data's
    residency and memory_limit (ssl_pipeline/core/residency.py)."""
    runtime = setup_runtime(compute, seed=0)
    checkpoint = load_checkpoint(model_path)
    model = prepare(load_classifier(checkpoint), runtime.device)
    images = job_images({"test": ([split_images_path(data_dir, "test")], None)}, runtime.device, residency)["test"]
    labels = load_labels(f"{data_dir}/test_labels.npy", runtime.device)
    predictions = predict(model, images, Normalizer.load(f"{data_dir}/normalization.json", runtime.device), runtime)
    images.finish()
    run = checkpoint["config"]
    metrics = {
        "init": run["init"], "objective": run["objective"], "variant": run.get("variant"),
        "pretrain_seed": run.get("pretrain_seed"), "label_fraction": run["label_fraction"],
        "seed": run["seed"],
        "mode": run["finetune"]["mode"], "labeled_images": checkpoint["labeled_images"],
        "best_step": checkpoint["best_step"], "best_val_accuracy": round(checkpoint["best_val_accuracy"], 5),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        **classification_metrics(labels, predictions, checkpoint["num_classes"]),
    }
    write_json(metrics_path, metrics)
    log.info("%s: test accuracy %.4f", model_path, metrics["accuracy"])
    return metrics


class ProbeData:
    """The frozen encoder of a pretraining checkpoint and the labeled train and test splits: the labels on
    the device, the images where config data.residency puts them (read in chunks)."""

    def __init__(self, data_dir, encoder_path, compute: dict, residency=None):
        self.runtime = setup_runtime(compute, seed=0)
        device = self.runtime.device
        checkpoint = load_checkpoint(encoder_path)
        self.identity = pretraining_identity(checkpoint)
        # Where data-parallel pretraining ran: its world size and nodes. Not for one process (and older
        # checkpoints lack it): the metrics of an ordinary run name no machine.
        world = checkpoint.get("encoder_card", {}).get("world")
        self.world = world if world and world["world_size"] > 1 else None
        encoder = build_encoder(checkpoint["config"]["model"], checkpoint["in_channels"])
        encoder.load_state_dict(checkpoint["encoder"])
        self.encoder = prepare(encoder, device)
        self.normalize = Normalizer.load(f"{data_dir}/normalization.json", device)
        self.num_classes = read_json(f"{data_dir}/card.json")["num_classes"]
        held = job_images({split: ([split_images_path(data_dir, split)], None) for split in ("train", "test")},
                          device, residency)
        self.train_images, self.test_images = held["train"], held["test"]
        self.train_labels = load_labels(f"{data_dir}/train_labels.npy", device)
        self.test_labels = load_labels(f"{data_dir}/test_labels.npy", device)

    def features(self, images) -> torch.Tensor:
        return embed(self.encoder, images, self.normalize, self.runtime)

    def pixels(self, images) -> torch.Tensor:
        """uint8 images -> (N, C H W) float in [0, 1], the raw-pixel baseline's features."""
        return batched(lambda chunk: self.normalize.to_unit(chunk).flatten(1), images, INFERENCE_BATCH)

    def finish(self) -> None:
        self.train_images.finish()
        self.test_images.finish()


def evaluate_knn(data_dir, encoder_path, metrics_path, settings: dict, compute: dict, residency=None) -> dict:
    """kNN test accuracy of the pretrained encoder's features and, for reference, of raw pixels (unless
    settings knn_raw_pixels is false: they are held as float32, too large for ImageNet; the metric is then
    null). The labeled training split is the memory bank. settings: config `evaluate`; residency: config
    data's residency and memory_limit."""
    data = ProbeData(data_dir, encoder_path, compute, residency)
    k, temperature = settings["knn_k"], settings["knn_temperature"]
    if k > len(data.train_images):
        # A bank smaller than k (a tiny dataset) has only that many neighbours; every one of them votes.
        log.warning("config key evaluate.knn_k is %d but the memory bank (the train split) holds %d images: "
                    "using k = %d", k, len(data.train_images), len(data.train_images))
        k = len(data.train_images)

    def knn_accuracy(train_features, test_features) -> float:
        predictions = knn_predict(train_features, data.train_labels, test_features, data.num_classes, k,
                                  temperature)
        return round((predictions == data.test_labels).float().mean().item(), 5)

    metrics = {
        **data.identity,
        **({"pretraining_world": data.world} if data.world else {}),
        "k": k, "temperature": temperature, "memory_bank_size": len(data.train_images),
        "encoder_accuracy": knn_accuracy(data.features(data.train_images), data.features(data.test_images)),
        "raw_pixel_accuracy": knn_accuracy(data.pixels(data.train_images), data.pixels(data.test_images))
        if settings["knn_raw_pixels"] else None,
    }
    data.finish()
    write_json(metrics_path, metrics)
    raw = metrics["raw_pixel_accuracy"]
    log.info("kNN accuracy: encoder %.4f, raw pixels %s", metrics["encoder_accuracy"],
             "not computed (config evaluate.knn_raw_pixels: false)" if raw is None else f"{raw:.4f}")
    return metrics


# The probe's L-BFGS: its history (the problem has only C (D + 1) parameters, so a long one is cheap
# and cuts iterations on this ill-conditioned problem) and its convergence test, scikit-learn's lbfgs
# test with its default tolerance: max |gradient| of the objective in W and b at most 1e-4.
LBFGS_HISTORY = 100
GRADIENT_TOLERANCE = 1e-4
# Added to the second moment before its Cholesky factor, so that a dead feature (all zeros after
# standardising) cannot make it singular when weight_decay is 0; the objective keeps weight_decay.
WHITENING_RIDGE = 1e-6


def whitening(features: torch.Tensor, weight_decay: float):
    """-> (L, L^-1), (D, D) float64, where L L^T = X^T X / N + max(weight_decay, WHITENING_RIDGE) I
    (Cholesky): z = L^-1 x has an identity second moment, up to the ridge's share."""
    eye = torch.eye(features.shape[1], dtype=torch.float64, device=features.device)
    ridge = max(weight_decay, WHITENING_RIDGE)
    factor = torch.linalg.cholesky(features.T.double() @ features.double() / len(features) + ridge * eye)
    return factor, torch.linalg.solve_triangular(factor, eye, upper=False)


def fit_linear_classifier(features, labels, num_classes, weight_decay: float, max_iterations: int,
                          tolerance: float = GRADIENT_TOLERANCE):
    """Multinomial logistic regression on fixed features: mean cross-entropy + weight_decay / 2 |W|^2
    (bias not penalised), full batch with L-BFGS -> (the linear layer on `features`, iterations,
    converged).

    Preconditioned by whitening: with z = L^-1 x (see `whitening`) and W = V L^-1, the logits W x = V z
    and the penalty |V L^-1|^2 are unchanged, so is the minimiser, but L-BFGS works on V, whose
    Hessian's feature part is near the identity. The encoder's standardised features are strongly
    correlated (the covariance's condition number is about 1e5 for 512 features): unwhitened, the fit
    stopped at 500 iterations unconverged (docs/sweeps-and-claims.md, "Linear probe"). The loss is summed in float64, so
    the line search is not misled by float32 rounding of a mean over 54,000 rows, and loss and gradient
    are computed by hand, without autograd's extra passes over the (N, C) logits.
    Converged: max |gradient| in W and b (d/dW = d/dV L^T) at most `tolerance`, scikit-learn's lbfgs
    test with its default tolerance, on its objective with C = 1 / (N weight_decay), which is ours;
    tests/test_linear_probe.py compares the fit with scikit-learn's at a 100x tighter tolerance.
    """
    factor, inverse = whitening(features, weight_decay)
    whitened = features @ inverse.T.float()  # (N, D)
    factor_t, inverse = factor.T.float(), inverse.float()
    v = torch.zeros(num_classes, features.shape[1], device=features.device)
    bias = torch.zeros(num_classes, device=features.device)
    # max_eval well above max_iter: only the iteration budget, convergence or a stall ends the fit.
    # tolerance_grad 0: the closure ends the fit itself once the gradient in W passes the test.
    optimizer = torch.optim.LBFGS([v, bias], lr=1, max_iter=max_iterations, max_eval=25 * max_iterations,
                                  history_size=LBFGS_HISTORY, tolerance_grad=0, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    rows = torch.arange(len(labels), device=labels.device)
    last = {}

    @torch.no_grad()
    def closure():
        log_p = torch.addmm(bias, whitened, v.T).log_softmax(dim=1)  # (N, C)
        w = v @ inverse
        loss = -log_p[rows, labels].double().mean() + weight_decay / 2 * w.double().square().sum()
        residual = log_p.exp_()
        residual[rows, labels] -= 1  # softmax - one-hot: d(cross-entropy)/d(logits), times N
        grad_v = residual.T @ whitened / len(labels) + weight_decay * w @ inverse.T
        grad_b = residual.sum(dim=0) / len(labels)
        last["gradient"] = max((grad_v @ factor_t).abs().max().item(), grad_b.abs().max().item())
        if last["gradient"] <= tolerance:  # reported as stationary: L-BFGS accepts this point and stops
            grad_v.zero_(), grad_b.zero_()
        v.grad, bias.grad = grad_v, grad_b
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[v]["n_iter"]
    closure()  # at the point L-BFGS ended on, for the convergence test
    classifier = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        classifier.weight.copy_(v @ inverse)
        classifier.bias.copy_(bias)
    return classifier, iterations, last["gradient"] <= tolerance


def evaluate_linear(data_dir, encoder_path, metrics_path, settings: dict, compute: dict, residency=None) -> dict:
    """Linear evaluation (Chen et al. 2020, SimCLR §B.6; Kolesnikov et al. 2019): the encoder frozen, its
    features of the labeled train split computed once and standardised, a multinomial logistic
    regression with L2 penalty fitted on them to convergence, accuracy on the test split. settings:
    config `evaluate.linear_probe`; residency: config data's residency and memory_limit."""
    data = ProbeData(data_dir, encoder_path, compute, residency)
    with torch.no_grad():
        train, test = data.features(data.train_images).float(), data.features(data.test_images).float()
    data.finish()
    with torch.no_grad():
        mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
        train, test = (train - mean) / std, (test - mean) / std
    started = time.perf_counter()
    classifier, iterations, converged = fit_linear_classifier(
        train, data.train_labels, data.num_classes, settings["weight_decay"], settings["max_iterations"])
    log.info("linear probe: fit of %d x %d features in %.2f s, %d L-BFGS iterations, %s", *train.shape,
             time.perf_counter() - started, iterations, "converged" if converged else "NOT converged")
    if not converged:
        log.warning("L-BFGS stopped after %d iterations (evaluate.linear_probe.max_iterations %d) before "
                    "converging", iterations, settings["max_iterations"])
    with torch.no_grad():
        accuracy = (classifier(test).argmax(dim=1) == data.test_labels).float().mean().item()
        train_accuracy = (classifier(train).argmax(dim=1) == data.train_labels).float().mean().item()
    metrics = {**data.identity, "accuracy": round(accuracy, 5), "train_accuracy": round(train_accuracy, 5),
               "feature_dim": train.shape[1], "weight_decay": settings["weight_decay"],
               "iterations": iterations, "converged": converged}
    write_json(metrics_path, metrics)
    log.info("linear probe: test accuracy %.4f after %d L-BFGS iterations", accuracy, iterations)
    return metrics
