"""Smoke training on a tiny synthetic dataset, on the CPU: the loops learn and respect their inputs."""
import csv
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch

from ssl_pipeline.stages.evaluate import (classification_metrics, evaluate_classifier, evaluate_knn, evaluate_linear,
                                  fit_linear_classifier, knn_predict)
from ssl_pipeline.stages.finetune import finetune
from ssl_pipeline.objectives import is_collapsed
from ssl_pipeline.stages.preprocess import preprocess, write_label_subset
from ssl_pipeline.stages.pretrain import pretrain
from ssl_pipeline.core.runtime import GpuUnavailable, select_device, select_precision
from ssl_pipeline.core.training import load_checkpoint
from tests.conftest import needs_no_cuda, write_synthetic_idx

CPU = {"device": "cpu", "require_gpu": False, "precision": "fp32", "threads": 1}
MODEL = {"widths": [8, 16], "convs_per_stage": 1, "pool_size": 2}
PRETRAIN = {
    "objective": "simclr", "epochs": 6, "batch_size": 64, "learning_rate": 0.003, "weight_decay": 0.0,
    "warmup_epochs": 0, "seed": 0,
    "simclr": {"temperature": 0.5, "projection_hidden_dim": 32, "projection_dim": 16},
    "augment": {"crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 1.3333], "flip": True,
                "brightness_contrast": 0.2, "erase_probability": 0.0},
}
FINETUNE = {
    "mode": "full", "epochs": 30, "min_steps": 10, "batch_size": 32, "learning_rate": 0.005,
    "weight_decay": 0.0, "warmup_fraction": 0.0, "label_smoothing": 0.0, "evaluations": 5,
    "augment": {"max_shift": 1, "flip": False, "erase_probability": 0.0},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    files = write_synthetic_idx(root / "raw", num_classes=3, size=12, train_per_class=80, compress=False)
    raw = {role: root / "raw" / spec["name"] for role, spec in files.items()}
    preprocess(raw, root / "data", "synthetic", 0.25, split_seed=0)
    write_label_subset(root / "data" / "train_labels.npy", root / "data" / "card.json", 1.0, 0,
                       root / "data" / "subset.npy")
    return root / "data"


@pytest.fixture(scope="module")
def encoder_path(data_dir):
    path = data_dir.parent / "encoder.pt"
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", path,
             data_dir.parent / "pretrain_curve.csv", PRETRAIN, MODEL, CPU)
    return path


def read_curve(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_pretraining_reduces_the_contrastive_loss(encoder_path):
    curve = read_curve(encoder_path.parent / "pretrain_curve.csv")
    assert len(curve) == PRETRAIN["epochs"]
    assert float(curve[-1]["loss"]) < float(curve[0]["loss"]) - 0.2


def test_a_collapsing_objective_is_flagged_and_a_healthy_one_is_not(data_dir, tmp_path, encoder_path, caplog):
    """BYOL without its predictor collapses (Grill et al. 2020, Table 5a); with a target that starts
    as a copy of the online network and follows it closely (base momentum 0) and a high learning rate
    it does within a few epochs."""
    healthy = read_curve(encoder_path.parent / "pretrain_curve.csv")
    assert not is_collapsed(float(healthy[-1]["embedding_std"]), PRETRAIN["simclr"]["projection_dim"])
    byol = {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32, "predictor": False,
            "base_momentum": 0.0}
    settings = {**PRETRAIN, "objective": "byol", "byol": byol, "epochs": 4, "learning_rate": 0.2}
    with caplog.at_level(logging.WARNING, logger="ssl_pipeline"):
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / "byol.pt",
                 tmp_path / "curve.csv", settings, MODEL, CPU)
    curve = read_curve(tmp_path / "curve.csv")
    assert is_collapsed(float(curve[-1]["embedding_std"]), byol["projection_dim"])
    assert float(curve[-1]["embedding_std"]) < 0.5 * float(curve[0]["embedding_std"])
    assert "COLLAPSE: byol maps every image to nearly the same point" in caplog.text


def test_encoder_checkpoint_holds_weights_and_the_config_that_made_them(encoder_path):
    checkpoint = load_checkpoint(encoder_path)
    assert checkpoint["config"] == {"pretrain": PRETRAIN, "model": MODEL}
    assert checkpoint["in_channels"] == 1
    assert any(key.endswith("weight") for key in checkpoint["encoder"])


class FileOpens:
    """Records every file the interpreter opens, through Python's audit hooks (PEP 578)."""

    def __init__(self):
        self.paths, self.active = [], False
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        if self.active and event == "open" and not isinstance(args[0], (int, type(None))):
            self.paths.append(os.fsdecode(args[0]))


OPENS = FileOpens()


def test_pretraining_never_opens_a_label_file(data_dir, tmp_path):
    OPENS.paths.clear()
    OPENS.active = True
    try:
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / "encoder.pt",
                 tmp_path / "curve.csv", {**PRETRAIN, "epochs": 1}, MODEL, CPU)
    finally:
        OPENS.active = False
    read_from_data = {path.rsplit("/", 1)[-1] for path in OPENS.paths if path.startswith(str(data_dir))}
    assert read_from_data == {"train_images.npy", "normalization.json"}
    assert not [path for path in OPENS.paths if "label" in path.rsplit("/", 1)[-1]]


def test_pretraining_runs_with_no_label_file_present(data_dir, tmp_path):
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for name in ("train_images.npy", "normalization.json"):
        (unlabeled / name).write_bytes((data_dir / name).read_bytes())
    last = pretrain(unlabeled / "train_images.npy", unlabeled / "normalization.json",
                    tmp_path / "encoder.pt", tmp_path / "curve.csv", {**PRETRAIN, "epochs": 1}, MODEL, CPU)
    assert last["epoch"] == 1 and (tmp_path / "encoder.pt").exists()


def test_pretraining_is_deterministic_on_the_cpu(data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / f"{name}.pt",
                 tmp_path / f"{name}.csv", {**PRETRAIN, "epochs": 1}, MODEL, CPU)
        runs.append(load_checkpoint(tmp_path / f"{name}.pt")["encoder"])
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0)


def test_compiled_pretraining_agrees_with_eager_within_rounding(data_dir, tmp_path, caplog):
    """compute.compile: true fuses kernels, which reorders float sums: each epoch's loss and embedding
    spread agree with eager training within 0.1 % (the tolerance docs/performance.md, "Compiled steps", states), not
    bit for bit. Single weights are not compared: Adam's first steps move a weight by about the learning
    rate whatever the size of its gradient, so a rounding-level gradient near 0 may move it either way."""
    curves, weights = {}, {}
    caplog.set_level(logging.INFO)
    for compile in (False, True):
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / f"{compile}.pt",
                 tmp_path / f"{compile}.csv", {**PRETRAIN, "epochs": 2}, MODEL, {**CPU, "compile": compile})
        curves[compile] = read_curve(tmp_path / f"{compile}.csv")
        weights[compile] = load_checkpoint(tmp_path / f"{compile}.pt")["encoder"]
    assert weights[True].keys() == weights[False].keys()  # compiled in place: the same checkpoint keys
    for eager, compiled in zip(curves[False], curves[True]):
        for column in ("loss", "embedding_std"):
            assert float(compiled[column]) == pytest.approx(float(eager[column]), rel=1e-3)
    compiled_runs = [record for record in caplog.records if "torch.compile" in record.getMessage()]
    assert len(compiled_runs) == 1  # the runtime logged one compiled run and one eager


def run_finetune(data_dir, tmp_path, init, encoder=None, **overrides):
    model_path = tmp_path / f"{init}.pt"
    result = finetune(data_dir, data_dir / "subset.npy", encoder, model_path, tmp_path / f"{init}.csv",
                      init, 1.0, 0, {**FINETUNE, **overrides}, MODEL, CPU)
    return result, read_curve(tmp_path / f"{init}.csv"), load_checkpoint(model_path)


def test_finetuning_reduces_the_loss_and_keeps_the_best_validation_checkpoint(data_dir, tmp_path):
    result, curve, checkpoint = run_finetune(data_dir, tmp_path, "scratch")
    assert float(curve[-1]["train_loss"]) < 0.5 * float(curve[0]["train_loss"])
    best = max(curve, key=lambda row: float(row["val_accuracy"]))
    assert checkpoint["best_step"] == int(best["step"]) == result["best_step"]
    assert checkpoint["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-5)
    assert result["best_val_accuracy"] > 0.9


def test_linear_probe_leaves_the_pretrained_encoder_unchanged(data_dir, tmp_path, encoder_path):
    _, _, checkpoint = run_finetune(data_dir, tmp_path, "pretrained", encoder_path, mode="linear_probe")
    pretrained = load_checkpoint(encoder_path)["encoder"]
    for key, value in pretrained.items():
        torch.testing.assert_close(checkpoint["model"][f"encoder.{key}"], value, rtol=0, atol=0)


def test_pretrained_encoder_must_match_the_model_config(data_dir, tmp_path, encoder_path):
    other = {**MODEL, "widths": [8, 32]}
    with pytest.raises(ValueError, match="was pretrained with model settings"):
        finetune(data_dir, data_dir / "subset.npy", encoder_path, tmp_path / "m.pt", tmp_path / "c.csv",
                 "pretrained", 1.0, 0, FINETUNE, other, CPU)


def test_evaluation_writes_test_metrics_of_a_fine_tuned_model(data_dir, tmp_path):
    run_finetune(data_dir, tmp_path, "scratch")
    metrics = evaluate_classifier(data_dir, tmp_path / "scratch.pt", tmp_path / "metrics.json", CPU)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 60 and matrix.sum(axis=1).tolist() == [20, 20, 20]
    assert metrics["accuracy"] == pytest.approx(matrix.trace() / 60)
    assert (metrics["init"], metrics["label_fraction"], metrics["seed"]) == ("scratch", 1.0, 0)
    assert metrics["accuracy"] > 0.9


def test_knn_probe_reports_encoder_and_raw_pixel_accuracy(data_dir, tmp_path, encoder_path):
    metrics = evaluate_knn(data_dir, encoder_path, tmp_path / "knn.json",
                           {"knn_k": 5, "knn_temperature": 0.1, "knn_raw_pixels": True}, CPU)
    assert 0 < metrics["encoder_accuracy"] <= 1 and 0 < metrics["raw_pixel_accuracy"] <= 1
    assert metrics["memory_bank_size"] == 180


def test_knn_probe_without_raw_pixels_writes_null_and_the_same_encoder_accuracy(data_dir, tmp_path, encoder_path,
                                                                                 caplog):
    """config evaluate.knn_raw_pixels: false, as the ImageNet experiments set it: no float32 copy of the splits."""
    caplog.set_level(logging.INFO)
    settings = {"knn_k": 5, "knn_temperature": 0.1}
    with_pixels = evaluate_knn(data_dir, encoder_path, tmp_path / "a.json", {**settings, "knn_raw_pixels": True}, CPU)
    without = evaluate_knn(data_dir, encoder_path, tmp_path / "b.json", {**settings, "knn_raw_pixels": False}, CPU)
    assert without["raw_pixel_accuracy"] is None and with_pixels["raw_pixel_accuracy"] is not None
    assert without["encoder_accuracy"] == with_pixels["encoder_accuracy"]
    assert json.loads((tmp_path / "b.json").read_text())["raw_pixel_accuracy"] is None
    assert "raw pixels not computed (config evaluate.knn_raw_pixels: false)" in caplog.text


def test_knn_probe_with_k_larger_than_the_memory_bank_lets_every_image_vote(data_dir, tmp_path, encoder_path, caplog):
    metrics = evaluate_knn(data_dir, encoder_path, tmp_path / "knn.json",
                           {"knn_k": 1000, "knn_temperature": 0.1, "knn_raw_pixels": True}, CPU)
    assert metrics["k"] == 180 and 0 < metrics["encoder_accuracy"] <= 1
    assert "config key evaluate.knn_k is 1000 but the memory bank (the train split) holds 180 images" in caplog.text


def test_linear_probe_fits_to_convergence_on_frozen_features_and_names_its_pretraining_run(
        data_dir, tmp_path, encoder_path):
    metrics = evaluate_linear(data_dir, encoder_path, tmp_path / "linear.json",
                              {"weight_decay": 1e-4, "max_iterations": 500}, CPU)
    assert metrics["converged"] and 0 < metrics["iterations"] < 500
    assert metrics["accuracy"] > 1 / 3 + 0.2 and metrics["train_accuracy"] >= metrics["accuracy"] - 0.2
    assert (metrics["objective"], metrics["variant"], metrics["pretrain_seed"]) == ("simclr", "base", 0)


def test_the_linear_classifier_separates_separable_features_and_stops_at_its_iteration_budget():
    centres = torch.eye(3) * 4
    features = centres.repeat_interleave(20, dim=0) + 0.3 * torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3).repeat_interleave(20)
    classifier, iterations, converged = fit_linear_classifier(features, labels, 3, 1e-3, 500)
    assert converged and (classifier(features).argmax(dim=1) == labels).all()
    _, iterations, converged = fit_linear_classifier(features, labels, 3, 1e-3, 2)
    assert not converged and iterations == 2


def test_knn_predict_finds_the_class_of_well_separated_points():
    centres = torch.eye(4) * 10
    train = centres.repeat_interleave(5, dim=0) + 0.1 * torch.randn(20, 4)
    labels = torch.arange(4).repeat_interleave(5)
    queries = centres + 0.1 * torch.randn(4, 4)
    assert knn_predict(train, labels, queries, 4, k=3, temperature=0.1).tolist() == [0, 1, 2, 3]


def test_classification_metrics_from_a_known_confusion():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 2])
    metrics = classification_metrics(labels, predictions, 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"] == [0.5, pytest.approx(0.66667), 1.0]


# ---- device selection (the fallback to the CPU: tests/test_distributed.py) -------------------------

@needs_no_cuda
def test_a_required_gpu_that_is_missing_is_an_error():
    with pytest.raises(GpuUnavailable, match="compute.require_gpu"):
        select_device("auto", require_gpu=True)


def test_precision_follows_the_config(monkeypatch):
    cpu = torch.device("cpu")
    assert select_precision("fp32", cpu) == torch.float32
    assert select_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr("ssl_pipeline.core.runtime.cpu_has_fast_bf16", lambda: True)
    assert select_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr("ssl_pipeline.core.runtime.cpu_has_fast_bf16", lambda: False)
    assert select_precision("auto", cpu) == torch.float32
