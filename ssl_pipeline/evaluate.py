"""Test-set metrics of fine-tuned models, and the kNN probe of the pretrained encoder."""
import logging

import numpy as np
import torch
import torch.nn.functional as F

from ssl_pipeline.artifacts import read_json, write_json
from ssl_pipeline.data import Normalizer, load_array, load_labels
from ssl_pipeline.inference import embed, predict
from ssl_pipeline.models import Classifier, build_encoder, prepare
from ssl_pipeline.runtime import setup_runtime
from ssl_pipeline.training import load_checkpoint, pretraining_identity

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


def evaluate_classifier(data_dir, model_path, metrics_path, compute: dict) -> dict:
    """Test accuracy, per-class accuracy and confusion matrix of one fine-tuned model."""
    runtime = setup_runtime(compute, seed=0)
    checkpoint = load_checkpoint(model_path)
    model = prepare(load_classifier(checkpoint), runtime.device)
    images = load_array(f"{data_dir}/test_images.npy", runtime.device)
    labels = load_labels(f"{data_dir}/test_labels.npy", runtime.device)
    predictions = predict(model, images, Normalizer.load(f"{data_dir}/normalization.json", runtime.device), runtime)
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
    """The frozen encoder of a pretraining checkpoint and the labeled train and test splits, on the device."""

    def __init__(self, data_dir, encoder_path, compute: dict):
        self.runtime = setup_runtime(compute, seed=0)
        device = self.runtime.device
        checkpoint = load_checkpoint(encoder_path)
        self.identity = pretraining_identity(checkpoint)
        encoder = build_encoder(checkpoint["config"]["model"], checkpoint["in_channels"])
        encoder.load_state_dict(checkpoint["encoder"])
        self.encoder = prepare(encoder, device)
        self.normalize = Normalizer.load(f"{data_dir}/normalization.json", device)
        self.num_classes = read_json(f"{data_dir}/card.json")["num_classes"]
        self.train_images = load_array(f"{data_dir}/train_images.npy", device)
        self.train_labels = load_labels(f"{data_dir}/train_labels.npy", device)
        self.test_images = load_array(f"{data_dir}/test_images.npy", device)
        self.test_labels = load_labels(f"{data_dir}/test_labels.npy", device)

    def features(self, images) -> torch.Tensor:
        return embed(self.encoder, images, self.normalize, self.runtime)


def evaluate_knn(data_dir, encoder_path, metrics_path, settings: dict, compute: dict) -> dict:
    """kNN test accuracy of the pretrained encoder's features and, for reference, of raw pixels.
    The labeled training split is the memory bank. settings: config `evaluate`."""
    data = ProbeData(data_dir, encoder_path, compute)
    k, temperature = settings["knn_k"], settings["knn_temperature"]

    def knn_accuracy(train_features, test_features) -> float:
        predictions = knn_predict(train_features, data.train_labels, test_features, data.num_classes, k,
                                  temperature)
        return round((predictions == data.test_labels).float().mean().item(), 5)

    metrics = {
        **data.identity,
        "k": k, "temperature": temperature, "memory_bank_size": len(data.train_images),
        "encoder_accuracy": knn_accuracy(data.features(data.train_images), data.features(data.test_images)),
        "raw_pixel_accuracy": knn_accuracy(data.normalize.to_unit(data.train_images).flatten(1),
                                           data.normalize.to_unit(data.test_images).flatten(1)),
    }
    write_json(metrics_path, metrics)
    log.info("kNN accuracy: encoder %.4f, raw pixels %.4f", metrics["encoder_accuracy"],
             metrics["raw_pixel_accuracy"])
    return metrics


def fit_linear_classifier(features, labels, num_classes, weight_decay: float, max_iterations: int):
    """Multinomial logistic regression on fixed features, full batch with L-BFGS until its gradient or
    loss change falls below tolerance (or max_iterations) -> (the linear layer, iterations, converged)."""
    torch.manual_seed(0)
    classifier = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    # max_eval well above max_iter: only the iteration budget (or convergence) ends the fit.
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1, max_iter=max_iterations,
                                  max_eval=25 * max_iterations, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels) + weight_decay / 2 * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[classifier.weight]["n_iter"]
    return classifier, iterations, iterations < max_iterations


def evaluate_linear(data_dir, encoder_path, metrics_path, settings: dict, compute: dict) -> dict:
    """Linear evaluation (Chen et al. 2020, SimCLR §B.6; Kolesnikov et al. 2019): the encoder frozen, its
    features of the labeled train split computed once and standardised, a multinomial logistic
    regression with L2 penalty fitted on them to convergence, accuracy on the test split. settings:
    config `evaluate.linear_probe`."""
    data = ProbeData(data_dir, encoder_path, compute)
    with torch.no_grad():
        train, test = data.features(data.train_images).float(), data.features(data.test_images).float()
        mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
        train, test = (train - mean) / std, (test - mean) / std
    classifier, iterations, converged = fit_linear_classifier(
        train, data.train_labels, data.num_classes, settings["weight_decay"], settings["max_iterations"])
    if not converged:
        log.warning("L-BFGS stopped at max_iterations %d before converging", iterations)
    with torch.no_grad():
        accuracy = (classifier(test).argmax(dim=1) == data.test_labels).float().mean().item()
        train_accuracy = (classifier(train).argmax(dim=1) == data.train_labels).float().mean().item()
    metrics = {**data.identity, "accuracy": round(accuracy, 5), "train_accuracy": round(train_accuracy, 5),
               "feature_dim": train.shape[1], "weight_decay": settings["weight_decay"],
               "iterations": iterations, "converged": converged}
    write_json(metrics_path, metrics)
    log.info("linear probe: test accuracy %.4f after %d L-BFGS iterations", accuracy, iterations)
    return metrics
