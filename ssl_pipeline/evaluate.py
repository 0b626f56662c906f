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
from ssl_pipeline.training import load_checkpoint

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
        "init": run["init"], "objective": run["objective"], "label_fraction": run["label_fraction"],
        "seed": run["seed"],
        "mode": run["finetune"]["mode"], "labeled_images": checkpoint["labeled_images"],
        "best_step": checkpoint["best_step"], "best_val_accuracy": round(checkpoint["best_val_accuracy"], 5),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        **classification_metrics(labels, predictions, checkpoint["num_classes"]),
    }
    write_json(metrics_path, metrics)
    log.info("%s: test accuracy %.4f", model_path, metrics["accuracy"])
    return metrics


def evaluate_knn(data_dir, encoder_path, metrics_path, settings: dict, compute: dict) -> dict:
    """kNN test accuracy of the pretrained encoder's features and, for reference, of raw pixels.
    The labeled training split is the memory bank. settings: config `evaluate`."""
    runtime = setup_runtime(compute, seed=0)
    device = runtime.device
    checkpoint = load_checkpoint(encoder_path)
    encoder = build_encoder(checkpoint["config"]["model"], checkpoint["in_channels"])
    encoder.load_state_dict(checkpoint["encoder"])
    encoder = prepare(encoder, device)
    normalize = Normalizer.load(f"{data_dir}/normalization.json", device)
    num_classes = read_json(f"{data_dir}/card.json")["num_classes"]
    train_images = load_array(f"{data_dir}/train_images.npy", device)
    train_labels = load_labels(f"{data_dir}/train_labels.npy", device)
    test_images = load_array(f"{data_dir}/test_images.npy", device)
    test_labels = load_labels(f"{data_dir}/test_labels.npy", device)
    k, temperature = settings["knn_k"], settings["knn_temperature"]

    def knn_accuracy(train_features, test_features) -> float:
        predictions = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
        return round((predictions == test_labels).float().mean().item(), 5)

    metrics = {
        "objective": checkpoint["config"]["pretrain"]["objective"],
        "k": k, "temperature": temperature, "memory_bank_size": len(train_images),
        "encoder_accuracy": knn_accuracy(embed(encoder, train_images, normalize, runtime),
                                         embed(encoder, test_images, normalize, runtime)),
        "raw_pixel_accuracy": knn_accuracy(normalize.to_unit(train_images).flatten(1),
                                           normalize.to_unit(test_images).flatten(1)),
    }
    write_json(metrics_path, metrics)
    log.info("kNN accuracy: encoder %.4f, raw pixels %.4f", metrics["encoder_accuracy"],
             metrics["raw_pixel_accuracy"])
    return metrics
