"""The race mode: ours against lightly, kNN accuracy after each pretraining epoch, from the same weights."""
import importlib.metadata
import json

import numpy as np
import pytest
import torch

from ssl_pipeline import benchmark
from ssl_pipeline.benchmark.race import KnnProbe, build_racers, race_summary
from ssl_pipeline.core.runtime import setup_runtime
from tests.conftest import synthetic_images
from tests.test_benchmark import CPU, run_benchmark, synthetic_override  # noqa: F401 (a fixture)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_tiny_race_writes_both_curves_the_target_and_the_plot(synthetic_override, tmp_path):  # noqa: F811
    out = tmp_path / "race.json"
    table = run_benchmark("race", "--tiny", "--device", "cpu", "--threads", "1", "--configfile", synthetic_override,
                          "--out", out)
    results = json.loads(out.read_text())

    settings = results["settings"]
    # --tiny: 512 of the 600 synthetic train images, all 200 test images, 2 epochs of batch 32.
    assert (settings["train_images"], settings["test_images"], settings["epochs"], settings["batch_size"]) == \
        (512, 200, 2, 32)
    assert settings["steps_per_epoch"] == 512 // 32 and settings["objective"] == "simclr"
    assert settings["memory_bank_images"] == 512 and (settings["knn_k"], settings["knn_temperature"]) == (20, 0.07)
    entries = results["implementations"]
    assert set(entries) == {"ours", "lightly"}
    for name, entry in entries.items():
        curve = entry["curve"]
        assert [point["epoch"] for point in curve] == [1, 2], name
        assert all(0 <= point["knn_accuracy"] <= 1 for point in curve)
        assert all(0 < point["train_seconds"] <= point["wall_seconds"] for point in curve)
        assert all(earlier["train_seconds"] < later["train_seconds"] and earlier["wall_seconds"] < later["wall_seconds"]
                   for earlier, later in zip(curve, curve[1:]))
        assert entry["final_knn_accuracy"] == curve[-1]["knn_accuracy"]
        # The synthetic classes are easy: both beat chance (0.1) by far after two epochs.
        assert entry["final_knn_accuracy"] > 0.5, name
    assert 0 <= results["initial_knn_accuracy"] <= 1

    target = results["target"]
    assert target["source"] == "lower final accuracy"
    assert target["knn_accuracy"] == min(entry["final_knn_accuracy"] for entry in entries.values())
    for name, entry in entries.items():
        # Both reach the lower final accuracy, at their first point at or above it.
        assert target[name] == next(point for point in entry["curve"]
                                    if point["knn_accuracy"] >= target["knn_accuracy"])
    assert results["time_ratio_lightly_over_ours"] == pytest.approx(
        target["lightly"]["train_seconds"] / target["ours"]["train_seconds"])

    meta = results["meta"]
    assert meta["command"].startswith("python -m ssl_pipeline.benchmark race --tiny")
    assert meta["device"] == "cpu" and meta["threads"] == 1 and meta["lightly"] == importlib.metadata.version("lightly")
    assert {"date", "device_name", "precision", "torch", "load_average_before", "other_processes_cpu_seconds",
            "seconds"} <= set(meta)
    plot = out.with_suffix(".png").read_bytes()
    assert plot.startswith(PNG_SIGNATURE) and len(plot) > 10_000  # a drawn figure, not an empty canvas
    assert "| ours |" in table and "| lightly |" in table and "ours is faster when above 1" in table


def curve(*points):
    """A race curve of (knn_accuracy, train_seconds) pairs, one per epoch."""
    return [{"epoch": epoch, "knn_accuracy": accuracy, "train_seconds": seconds, "wall_seconds": seconds + 1}
            for epoch, (accuracy, seconds) in enumerate(points, start=1)]


def test_the_target_is_the_lower_final_accuracy_unless_given():
    curves = {"ours": curve((0.5, 10), (0.7, 20), (0.8, 30)), "lightly": curve((0.4, 15), (0.6, 30), (0.75, 45))}
    summary = race_summary(curves)
    target = summary["target"]
    assert target["knn_accuracy"] == 0.75 and target["source"] == "lower final accuracy"
    assert target["ours"]["epoch"] == 3 and target["lightly"]["epoch"] == 3
    assert summary["time_ratio_lightly_over_ours"] == pytest.approx(45 / 30)
    assert [summary["implementations"][name]["final_knn_accuracy"] for name in ("ours", "lightly")] == [0.8, 0.75]

    given = race_summary(curves, target=0.6)["target"]
    assert given["source"] == "--target" and given["ours"]["epoch"] == 2 and given["lightly"]["epoch"] == 2
    missed = race_summary(curves, target=0.78)
    assert missed["target"]["lightly"] is None and missed["target"]["ours"]["epoch"] == 3
    assert missed["time_ratio_lightly_over_ours"] is None


def test_both_racers_start_from_the_same_backbone_and_the_probe_keeps_it_training():
    labels = np.repeat(np.arange(10), 8)
    split = benchmark.Split(synthetic_images(labels, 28, seed=3)[:, None], labels.astype(np.int64))
    config = benchmark.load_config()
    trainers = build_racers(config, split, CPU, workers=0, batch_size=16, total_steps=10)
    ours, lightly = (trainers[name].modules[0] for name in ("ours", "lightly"))
    assert ours is not lightly
    ours_state, lightly_state = ours.state_dict(), lightly.state_dict()
    assert list(ours_state) == list(lightly_state) and len(ours_state) > 10
    for name, tensor in ours_state.items():
        torch.testing.assert_close(tensor, lightly_state[name], rtol=0, atol=0, msg=name)
    assert trainers["ours"].batch_size == trainers["lightly"].batch_size == 16
    # The comparison tells weights apart: another seed gives another initial backbone.
    other = benchmark.build_trainer("pretrain", "ours", config, split, setup_runtime(CPU, benchmark.SEED + 1), 0, 16)
    first = next(iter(ours_state))
    assert not torch.equal(other.modules[0].state_dict()[first], ours_state[first])

    # The probe switches the backbone to eval mode for its features and back, so BatchNorm keeps training.
    probe = KnnProbe(split, split, config["evaluate"], setup_runtime(CPU, benchmark.SEED))
    assert 0 <= probe.accuracy(ours) <= 1 and ours.training
