"""The benchmark command: tiny runs write complete figures, and the reference it compares with trains the
same model, on the same loss and batch size, with augmentations like ours."""
import importlib.metadata
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from ssl_pipeline import benchmark

from ssl_pipeline.benchmark import reference

from ssl_pipeline.core import roofline
from ssl_pipeline.augment import contrastive_view, supervised_view
from ssl_pipeline.benchmark import peer
from ssl_pipeline.benchmark.data import CONSTANT_SCHEDULE_STEPS
from ssl_pipeline.core.data import Normalizer
from ssl_pipeline.stages.finetune import supervised_loss
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.stages.pretrain import contrastive_loss
from ssl_pipeline.core.runtime import setup_runtime
from tests.conftest import REPO, synthetic_images, write_synthetic_idx

CPU = {"device": "cpu", "require_gpu": False, "precision": "fp32", "threads": 1}
IDENTITY_AUGMENT = {
    "pretrain": {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip": False, "brightness_contrast": 0.0,
                 "erase_probability": 0.0},
    "finetune": {"max_shift": 0, "flip": False, "erase_probability": 0.0},
}


@pytest.fixture(scope="module")
def synthetic_override(tmp_path_factory):
    """A config override that points the dataset at a synthetic 28x28, 10-class IDX dataset."""
    root = tmp_path_factory.mktemp("benchmark")
    files = write_synthetic_idx(root / "mirror", num_classes=10, size=28, train_per_class=60, test_per_class=20)
    override = root / "synthetic.yaml"
    override.write_text(yaml.safe_dump({"dataset": {"mirrors": [str(root / "mirror")], "files": files}}))
    return override


def run_benchmark(*arguments):
    done = subprocess.run([sys.executable, "-m", "ssl_pipeline.benchmark", *map(str, arguments)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def numbers(tree, path="") -> list:
    """(path, value) of every number in a JSON tree."""
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in numbers(value, f"{path}.{key}")]
    if isinstance(tree, list):
        return [item for index, value in enumerate(tree) for item in numbers(value, f"{path}[{index}]")]
    return [(path, tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


# Figures that are legitimately zero: ours has no loader workers, and a quiet machine has no other load.
MAY_BE_ZERO = ("workers", "images_per_second_std", "load_average", "other_processes_cpu_seconds",
               "steal_cpu_seconds")
MEASUREMENT_FIELDS = {"stage", "objective", "implementation", "workers", "batch_size", "images_per_step", "parameters",
                      "loss", "steps_per_repetition", "images_per_second", "images_per_second_std",
                      "repetitions", "process_peak_rss_mib", "host_peak_rss_mib", "host_pss_mib",
                      "cuda_peak_allocated_mib", "device", "device_name", "threads", "precision",
                      "compiled", "compile_seconds", "flops_per_image", "tflops", "fraction_of_conv_roof",
                      "fraction_of_matmul_roof"}


# ---------------------------------------------------------------------------------------------------
# Tiny runs of the command
# ---------------------------------------------------------------------------------------------------

def test_tiny_speed_benchmark_writes_every_figure(synthetic_override, tmp_path):
    """Eager, compiled, reference and lightly rows, each with its FLOPs, TFLOP/s and fraction of the roof.
    Over 60 s (86 s in CI on 2026-12-01): one run of the real command, each of its measurements in a
    fresh process (torch, and lightly's imports, load in each), and the compiled rows compile; one run
    checks every row together, which is cheaper than a test per row."""
    out = tmp_path / "speed.json"
    table = run_benchmark("speed", "--tiny", "--device", "cpu", "--threads", "1", "--configfile",
                          synthetic_override, "--out", out)
    results = json.loads(out.read_text())

    assert set(results["stages"]) == {"pretrain simclr", "finetune"}  # pretraining per objective of the config
    roof = results["roof"]
    assert roof["precision"] == results["meta"]["precision"] and roof["threads"] == 1
    for name, entry in results["stages"].items():
        stage = name.split()[0]
        assert ("lightly" in entry) == (stage == "pretrain")  # lightly has no fine-tuning row
        peers = [entry["lightly"], *entry["lightly_candidates"]] if stage == "pretrain" else []
        runs = [entry["ours"], entry["ours_compiled"], entry["reference"], *entry["reference_candidates"], *peers]
        assert [run["compiled"] for run in runs] == [False, True, False, False] + [False] * len(peers)
        assert entry["ours_compiled"]["compile_seconds"] > 0 and entry["ours"]["compile_seconds"] is None
        # One model and loss: the same FLOPs per image whichever way the batches are made; lightly's
        # heads have ours' widths, and BatchNorm, where they differ, counts no FLOPs.
        assert len({run["flops_per_image"] for run in runs}) == 1
        assert entry["compiled_speedup"] == pytest.approx(entry["ours_compiled"]["images_per_second"]
                                                          / entry["reference"]["images_per_second"])
        for run in runs:
            assert set(run) == MEASUREMENT_FIELDS
            assert run["tflops"] == pytest.approx(run["flops_per_image"] * run["images_per_second"] / 1e12)
            assert run["fraction_of_conv_roof"] == pytest.approx(run["tflops"] / roof["conv_tflops"])
            assert run["stage"] == stage and run["device"] == "cpu"
            assert run["objective"] == ("simclr" if stage == "pretrain" else None)
            assert run["cuda_peak_allocated_mib"] is None  # no device memory to report on the CPU
            assert len(run["repetitions"]) == 3
            assert run["images_per_step"] == run["batch_size"] * (2 if stage == "pretrain" else 1)
            assert run["host_peak_rss_mib"] >= run["process_peak_rss_mib"] > 100  # torch alone is bigger
        assert entry["reference"] in entry["reference_candidates"]
        assert [run["workers"] for run in entry["reference_candidates"]] == [1]
        assert entry["speedup"] == pytest.approx(entry["ours"]["images_per_second"]
                                                 / entry["reference"]["images_per_second"])
        if peers:
            lightly = entry["lightly"]
            assert lightly in entry["lightly_candidates"] and {run["implementation"] for run in peers} == {"lightly"}
            assert [run["workers"] for run in entry["lightly_candidates"]] == [1]
            assert lightly["loss"] == "lightly NTXentLoss on two views"
            assert lightly["batch_size"] == entry["ours"]["batch_size"]
            # SimCLRProjectionHead: no bias before its BatchNorm, and a BatchNorm in place of the output bias.
            simclr = benchmark.load_config()["pretrain"]["simclr"]
            assert lightly["parameters"] - entry["ours"]["parameters"] == (simclr["projection_dim"]
                                                                         - simclr["projection_hidden_dim"])
            assert entry["speedup_over_lightly"] == pytest.approx(entry["ours"]["images_per_second"]
                                                                  / lightly["images_per_second"])
            assert entry["compiled_speedup_over_lightly"] == pytest.approx(
                entry["ours_compiled"]["images_per_second"] / lightly["images_per_second"])
    for path, value in numbers(results):
        if any(name in path for name in MAY_BE_ZERO):
            assert value >= 0, f"{path} is {value}"
        else:
            assert value > 0, f"{path} is {value}"
    assert {"date", "command", "device", "device_name", "threads", "precision", "torch", "load_average_before",
            "other_processes_cpu_seconds", "seconds"} <= set(results["meta"])
    assert results["meta"]["lightly"] == importlib.metadata.version("lightly")
    assert results["meta"]["command"].startswith("python -m ssl_pipeline.benchmark speed --tiny")
    assert "| pretraining simclr (2 views/image) | ours" in table
    # The config's precision is auto: bfloat16 on CPUs with AMX or AVX512-BF16, float32 elsewhere.
    assert ", compiled (" in table and "% of conv roof" in table and f"Roof ({roof['precision']}, 1 thread)" in table
    assert "reference: PIL + DataLoader, 1 worker |" in table
    assert (f"| lightly {results['meta']['lightly']}: its transforms, heads and loss + DataLoader, 1 worker |"
            in table)
    assert "| speed-up over reference | speed-up over lightly |" in table


def test_tiny_time_to_accuracy_reports_reached_and_missed_targets(synthetic_override, tmp_path):
    out = tmp_path / "accuracy.json"
    run_benchmark("time-to-accuracy", "--tiny", "--device", "cpu", "--threads", "1", "--configfile",
                  synthetic_override, "--targets", "0.5", "1.01", "--epochs", "2",
                  "--evaluations-per-epoch", "4", "--out", out)
    results = json.loads(out.read_text())

    curve = results["curve"]
    # 1.01 is never reached, so it trains the whole schedule, evaluating 4 times an epoch.
    assert [point["epochs"] for point in curve] == pytest.approx([0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2],
                                                                 abs=0.03)
    assert all(earlier["train_seconds"] < later["train_seconds"] <= later["wall_seconds"]
               for earlier, later in zip(curve, curve[1:]))
    reachable, impossible = results["targets"]
    # The synthetic classes are easy: two epochs get past 0.5 (chance is 0.1).
    assert reachable["reached"] and reachable["target"] == 0.5
    first = next(point for point in curve if point["test_accuracy"] >= 0.5)
    assert reachable["epochs"] == first["epochs"] and reachable["train_seconds"] == first["train_seconds"] > 0
    assert impossible == {"target": 1.01, "reached": False}
    assert results["settings"]["train_images"] == 600 and results["settings"]["test_images"] == 200


def test_flops_are_counted_on_forward_and_backward():
    """A linear layer's forward is 2·B·in·out FLOPs; backward computes two such products (the input's
    and the weight's gradients), so a training step counts three times the forward."""
    layer, inputs = torch.nn.Linear(8, 4), torch.randn(5, 8, requires_grad=True)
    forward = 2 * 5 * 8 * 4
    assert roofline.count_flops(lambda: layer(inputs)) == forward
    assert roofline.count_flops(lambda: layer(inputs).sum().backward()) == 3 * forward
    assert roofline.describe_flops(1.74e8) == "174 MFLOP"
    assert roofline.efficiency(1e9, 2000, {"conv_tflops": 4.0, "matmul_tflops": 8.0}) == {
        "tflops": 2.0, "fraction_of_conv_roof": 0.5, "fraction_of_matmul_roof": 0.25}


def test_gpu_check_stops_at_once_without_cuda_and_says_why(tmp_path):
    """With every GPU hidden, `make gpu-check` fails with the reason and writes no figures."""
    summary = REPO / "results" / "performance" / "gpu-check.json"
    before = summary.stat().st_mtime if summary.exists() else None
    done = subprocess.run([sys.executable, "-m", "ssl_pipeline.tools.gpu_check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO),
                                                        "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and done.stdout == ""
    message = done.stderr.strip()
    assert message.startswith("gpu-check: make gpu-check needs an NVIDIA GPU that PyTorch can use")
    assert "torch.cuda.is_available() is False" in message and "CUDA_VISIBLE_DEVICES=''" in message
    assert "Traceback" not in message
    assert (summary.stat().st_mtime if summary.exists() else None) == before
    # Under `make test` the environment carries MAKELEVEL/MAKEFLAGS, and a nested make would print
    # "Entering directory" lines; this asks a top-level make what it would run.
    environment = {key: value for key, value in os.environ.items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=REPO, capture_output=True,
                             text=True, check=True, env=environment)
    assert any(line.endswith("-m ssl_pipeline.tools.gpu_check") for line in dry_run.stdout.splitlines()), dry_run.stdout


# ---------------------------------------------------------------------------------------------------
# Like with like
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_split():
    labels = np.repeat(np.arange(10), 8)
    return benchmark.Split(synthetic_images(labels, 28, seed=3)[:, None], labels.astype(np.int64))


def build_pair(stage, config, split, batch_size=16):
    """Ours and the reference for `stage`, each built right after seeding, as in the benchmark."""
    trainers = []
    for implementation in ("ours", "reference"):
        runtime = setup_runtime(CPU, benchmark.SEED)
        trainers.append(benchmark.build_trainer(stage, implementation, config, split, runtime, 0, batch_size))
    return trainers, runtime


def normalizer_of(split):
    return Normalizer(normalization_statistics(split.images), torch.device("cpu"))


@pytest.mark.parametrize("stage", benchmark.STAGES)
def test_reference_and_ours_train_the_same_model_with_the_same_loss_and_batch(stage, train_split):
    """Without augmentation both pipelines feed the same tensors, so equal losses mean equal models,
    weights, loss functions and batches."""
    config = benchmark.load_config()
    config[stage]["augment"] = IDENTITY_AUGMENT[stage]
    (ours, theirs), runtime = build_pair(stage, config, train_split)

    assert [repr(module) for module in ours.modules] == [repr(module) for module in theirs.modules]
    assert benchmark.parameter_count(ours) == benchmark.parameter_count(theirs) > 100_000
    for mine, other in zip(ours.modules, theirs.modules):
        for (name, tensor), (_, other_tensor) in zip(mine.state_dict().items(), other.state_dict().items()):
            torch.testing.assert_close(tensor, other_tensor, msg=name)
    assert ours.batch_size == theirs.batch_size == 16
    assert ours.images_per_step == theirs.images_per_step == (32 if stage == "pretrain" else 16)
    assert ours.loss_name == theirs.loss_name

    count = ours.batch_size
    normalize = normalizer_of(train_split)
    images = torch.from_numpy(train_split.images[:count])
    labels = torch.from_numpy(train_split.labels[:count])
    inputs, targets = default_collate([theirs.loader.dataset[index] for index in range(count)])
    generator = torch.Generator().manual_seed(0)
    if stage == "pretrain":
        encoder, objective = ours.modules
        our_loss, _ = contrastive_loss(encoder, objective, normalize, images, config[stage]["augment"], generator,
                                       runtime)
        their_loss = reference.contrastive_loss(*theirs.modules, inputs, runtime)
    else:
        our_loss = supervised_loss(ours.modules[0], normalize, images, labels, config[stage], generator,
                                   runtime)
        their_loss = reference.supervised_loss(theirs.modules[0], inputs, targets,
                                               config[stage]["label_smoothing"], runtime)
        assert torch.equal(targets, labels)
    assert math.isfinite(our_loss.item())
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-4, atol=1e-5)


def reference_views(image, transform, count, mean=0.3, std=0.3):
    """`count` draws of `transform` on one uint8 image (1, C, H, W), back in [0, 1] units."""
    dataset = reference.TutorialDataset(image, None, transform)
    torch.manual_seed(0)
    return torch.stack([dataset[0][0] for _ in range(count)]) * std + mean


def test_reference_fine_tuning_views_are_exactly_ours():
    """Translation by up to 2 pixels with zero padding and a flip: torchvision can express ours exactly,
    so both must produce the same 5 x 5 x 2 distinct views of an image."""
    augment = {"max_shift": 2, "flip": True, "erase_probability": 0.0}
    image = synthetic_images(np.array([3]), 28, seed=3)[:, None]  # (1, 1, 28, 28)
    ours = supervised_view(torch.from_numpy(image).float().repeat(1000, 1, 1, 1) / 255, augment,
                           torch.Generator().manual_seed(0))
    theirs = reference_views(image, reference.supervised_transform(augment, [0.3], [0.3], [28, 28]), 1000)

    def distinct(views):
        return {view.numpy().tobytes() for view in (views * 255).round().to(torch.uint8)}
    assert len(distinct(ours)) == 50
    assert distinct(theirs) == distinct(ours)


def test_reference_erases_as_often_and_as_much_as_ours():
    augment = {**IDENTITY_AUGMENT["pretrain"], "erase_probability": 0.25}
    white = np.full((1, 1, 28, 28), 255, dtype=np.uint8)
    ours = contrastive_view(torch.ones(1000, 1, 28, 28), augment, torch.Generator().manual_seed(0))
    theirs = reference_views(white, reference.contrastive_transform(augment, [0.3], [0.3], [28, 28]), 1000)
    figures = []
    for views in (ours, theirs):
        erased = (views < 0.5).float().mean(dim=(1, 2, 3))  # share of each view blanked
        figures.append(((erased > 0).float().mean().item(), erased[erased > 0].mean().item()))
    (our_share, our_area), (their_share, their_area) = figures
    assert our_share == pytest.approx(0.25, abs=0.05) and their_share == pytest.approx(0.25, abs=0.05)
    # Box area uniform in 2-25% of the image in both: about 13.5% on average.
    assert our_area == pytest.approx(their_area, abs=0.03) and our_area == pytest.approx(0.135, abs=0.03)


# ---------------------------------------------------------------------------------------------------
# lightly's recipe (ssl_pipeline/benchmark/peer.py)
# ---------------------------------------------------------------------------------------------------

def lightly_head_difference(objective: str, settings: dict) -> int:
    """lightly's heads' trainable parameters minus ours', as peer.py states them: no bias in a Linear
    before a BatchNorm, SimCLR's head ends in a BatchNorm instead of a bias, MoCo v2's has no BatchNorm."""
    if objective == "simclr":
        mlp = settings["projection_dim"] - settings["projection_hidden_dim"]
        return {"mlp": mlp, "linear": 0, "none": 0}[settings["projection"]]
    if objective == "byol":
        return -settings["projection_hidden_dim"] - settings["prediction_hidden_dim"]
    width = {"vicreg": "expander_dim", "barlow_twins": "projection_dim", "moco_v2": "projection_hidden_dim"}
    return -2 * settings[width[objective]]


def ours_and_lightly(split, objective, projection="mlp", total_steps=CONSTANT_SCHEDULE_STEPS):
    """(config, ours, lightly) for pretraining with `objective`, each trainer built right after seeding."""
    config = benchmark.load_config()
    config["pretrain"]["objective"] = objective
    config["pretrain"]["simclr"]["projection"] = projection
    trainers = []
    for implementation in ("ours", "lightly"):
        runtime = setup_runtime(CPU, benchmark.SEED)
        trainers.append(benchmark.build_trainer("pretrain", implementation, config, split, runtime, 0, 16,
                                                total_steps=total_steps))
    return config, *trainers


@pytest.mark.parametrize("objective, projection", [("simclr", "mlp"), ("simclr", "linear"), ("simclr", "none"),
                                                   ("byol", "mlp"), ("vicreg", "mlp"), ("barlow_twins", "mlp"),
                                                   ("moco_v2", "mlp")])
def test_lightly_trainer_takes_a_step_with_our_backbone_and_heads_of_our_sizes(objective, projection, train_split):
    config, ours, lightly = ours_and_lightly(train_split, objective, projection)

    assert (lightly.stage, lightly.implementation, lightly.batch_size, lightly.images_per_step) == \
        ("pretrain", "lightly", 16, 32)
    encoder = lightly.modules[0]
    assert repr(encoder) == repr(ours.modules[0])  # the same backbone, with the same initial weights
    for (name, tensor), (_, other) in zip(encoder.state_dict().items(), ours.modules[0].state_dict().items()):
        torch.testing.assert_close(tensor, other, msg=name)
    assert benchmark.parameter_count(lightly) - benchmark.parameter_count(ours) == \
        lightly_head_difference(objective, config["pretrain"][objective])

    before = [p.detach().clone() for p in encoder.parameters()]
    with torch.profiler.profile() as profiler:
        lightly.step()
    assert {"batch", "forward", "update"} <= {event.key for event in profiler.key_averages()}
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
    changed = sum(not torch.equal(old, new) for old, new in zip(before, encoder.parameters()))
    assert changed > len(before) // 2  # AdamW moved the backbone


@pytest.mark.parametrize("objective", ["byol", "moco_v2"])
def test_momentum_targets_follow_the_schedule_of_total_steps(objective, train_split):
    """Over a 2-step schedule BYOL's target momentum rises from base to 1, so the second update leaves the
    target as the first left it; MoCo's constant momentum moves it again. Ours and lightly's alike."""
    for trainer in ours_and_lightly(train_split, objective, total_steps=2)[1:]:
        ours_moco = trainer.implementation == "ours" and objective == "moco_v2"
        target = getattr(trainer.modules[1], "key_encoder" if ours_moco else "target_encoder")
        snapshots = [[p.detach().clone() for p in target.parameters()]]
        for _ in range(2):
            trainer.step()
            snapshots.append([p.detach().clone() for p in target.parameters()])
        moved = [not all(map(torch.equal, old, new)) for old, new in zip(snapshots, snapshots[1:])]
        assert moved == ([True, False] if objective == "byol" else [True, True]), trainer.implementation


MEAN, STD = [0.2, 0.3, 0.4], [0.25, 0.3, 0.35]
LIGHTLY_IDENTITY = {**IDENTITY_AUGMENT["pretrain"], "color_jitter": {"probability": 0.0}, "grayscale_probability": 0.0}


def lightly_views(image, augment, count, objective="simclr"):
    """`count` views (count / 2 draws of two) of lightly's transform of one uint8 image (1, C, H, W),
    standardised with MEAN and STD, and back in [0, 1] units."""
    channels = image.shape[1]
    mean, std = MEAN[:channels], STD[:channels]
    transform = peer.lightly_transform(objective, augment, mean, std, list(image.shape[2:]), channels)
    dataset = reference.TutorialDataset(image, None, transform)
    torch.manual_seed(0)
    views = torch.stack([view for _ in range(count // 2) for view in dataset[0][0]])
    return views * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("objective", ["simclr", "byol", "vicreg", "barlow_twins", "moco_v2"])
def test_lightly_views_are_our_standardised_images_without_augmentation(objective, channels):
    """Two float32 (C, H, W) views standardised with the mean and std we give (not ImageNet's): with every
    augmentation off, each is the image itself."""
    image = np.random.default_rng(0).integers(0, 256, (1, channels, 28, 28), dtype=np.uint8)
    views = lightly_views(image, LIGHTLY_IDENTITY, 2, objective)
    assert views.dtype == torch.float32 and views.shape == (2, channels, 28, 28)
    torch.testing.assert_close(views, torch.from_numpy(image).float().expand(2, -1, -1, -1) / 255, rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("smallest", [0.3, 0.6])
def test_lightly_crops_keep_the_share_of_the_area_we_ask_for(smallest):
    """Red ramps along the columns and green along the rows: a view's spread of each is the share of the
    width and height its crop kept, their product the share of the area: within crop_scale [smallest, 1]."""
    ramp = np.arange(64, dtype=np.uint8) * 4
    image = np.zeros((1, 3, 64, 64), dtype=np.uint8)
    image[0, 0], image[0, 1] = ramp[None, :], ramp[:, None]
    views = lightly_views(image, {**LIGHTLY_IDENTITY, "crop_scale": [smallest, 1.0], "flip": True}, 400)

    def kept(channel):  # (N, H, W) -> share of the ramp's length in each view
        return (channel.amax(dim=(1, 2)) - channel.amin(dim=(1, 2))) * 255 / 4 / 63
    area = kept(views[:, 0]) * kept(views[:, 1])
    assert area.min() > smallest - 0.05 and area.max() < 1.01
    assert (area < smallest + 0.1).float().mean() > 0.05  # and the smallest crops do occur


def test_lightly_views_are_erased_as_often_and_as_much_as_ours():
    """torchvision's RandomErasing after lightly's views: black boxes (0 before standardising, as ours) in a
    quarter of the views, 2-25 % of the image, about 13.5 % on average."""
    views = lightly_views(np.full((1, 1, 28, 28), 255, dtype=np.uint8), {**LIGHTLY_IDENTITY, "erase_probability": 0.25},
                          1000)
    black = views.abs() < 1e-5
    assert (black | ((views - 1).abs() < 1e-5)).all()  # black or the white image, nothing else
    erased = black.float().mean(dim=(1, 2, 3))
    assert (erased > 0).float().mean().item() == pytest.approx(0.25, abs=0.05)
    assert erased[erased > 0].mean().item() == pytest.approx(0.135, abs=0.03)
