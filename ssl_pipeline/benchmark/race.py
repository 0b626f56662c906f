"""Race mode: pretraining quality against time, ours against lightly, by the kNN probe after each epoch."""
import platform
import time
from datetime import datetime, timezone

import torch

from ssl_pipeline.benchmark.data import SEED, load_split
from ssl_pipeline.benchmark.measure import device_description
from ssl_pipeline.benchmark.peer import build_lightly_trainer, lightly_version
from ssl_pipeline.benchmark.speed import MachineLoad, machine_load, threads
from ssl_pipeline.benchmark.trainers import build_trainer, warmup_steps
from ssl_pipeline.core.data import Normalizer
from ssl_pipeline.stages.evaluate import knn_predict
from ssl_pipeline.core.inference import embed
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.core.roofline import synchronize
from ssl_pipeline.core.runtime import setup_runtime

RACERS = ("ours", "lightly")
# The default size. Measured on a 2-CPU AMD EPYC, 2 threads, bf16 autocast, SimCLR, batch 256, in
# interleaved blocks of 2 steps, the quietest blocks: ours 0.30-0.36 s a step; lightly 0.49-0.54 s with 1
# DataLoader worker, 0.50-0.57 with 2, 0.51-0.64 with 0 (so 1 worker); one probe 0.22 ms an image (bank
# plus queries). 30,000 train images (117 steps an epoch) x 7 epochs, each probe with all 10,000 test
# images (15 probes), come to ~700 s of training and ~130 s of probes: ~14 minutes with set-up.
DEFAULT_IMAGES, DEFAULT_TEST_IMAGES, DEFAULT_EPOCHS, DEFAULT_WORKERS = 30_000, 10_000, 7, 1


def build_racers(config: dict, train, compute: dict, workers: int, batch_size: int, total_steps: int) -> dict:
    """Ours and lightly's pretraining trainers, each built right after seeding, so both start from the
    same initial backbone weights, with a warm-up + cosine schedule over `total_steps`."""
    runtime = setup_runtime(compute, SEED)
    ours = build_trainer("pretrain", "ours", config, train, runtime, 0, batch_size, total_steps=total_steps)
    runtime = setup_runtime(compute, SEED)
    lightly = build_lightly_trainer(config, train, runtime, workers, batch_size, total_steps)
    return {"ours": ours, "lightly": lightly}


class KnnProbe:
    """The pipeline's kNN probe (evaluate.knn_predict, config `evaluate`) of a backbone: the labeled train
    images are the memory bank, the test images the queries; features by inference.embed, one Normalizer."""

    def __init__(self, train, test, settings: dict, runtime):
        device = runtime.device
        self.runtime, self.k, self.temperature = runtime, settings["knn_k"], settings["knn_temperature"]
        self.normalize = Normalizer(normalization_statistics(train.images), device)
        self.bank_images, self.test_images = (torch.from_numpy(split.images).to(device) for split in (train, test))
        self.bank_labels, self.test_labels = (torch.from_numpy(split.labels).to(device) for split in (train, test))
        self.num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    def accuracy(self, encoder) -> float:
        was_training = encoder.training  # embed switches it to eval; training must go on in train mode
        bank = embed(encoder, self.bank_images, self.normalize, self.runtime)
        queries = embed(encoder, self.test_images, self.normalize, self.runtime)
        encoder.train(was_training)
        predictions = knn_predict(bank, self.bank_labels, queries, self.num_classes, self.k, self.temperature)
        return (predictions == self.test_labels).float().mean().item()


def first_reaching(curve: list, target: float):
    """The first point of `curve` at or above `target`, else None."""
    return next((point for point in curve if point["knn_accuracy"] >= target), None)


def race(config: dict, raw_dir, compute: dict, objective: str, epochs: int, images: int, test_images: int,
         workers: int, batch_size: int = None, target: float = None, log=print) -> dict:
    """Pretrain with `objective`, ours and lightly, for `epochs` epochs each on the same `images` train
    images, taking turns epoch by epoch (so a change in the machine's load hits both), and probe each
    backbone after every epoch with the clock stopped."""
    load = MachineLoad()
    config = {**config, "pretrain": {**config["pretrain"], "objective": objective}}
    # Eager: compiling would count as training time (the speed mode reports it separately).
    compute = {**compute, "compile": False}
    train = load_split(raw_dir, config, "train", images)
    test = load_split(raw_dir, config, "test", test_images)
    batch_size = min(batch_size or config["pretrain"]["batch_size"], len(train.images))
    steps_per_epoch = len(train.images) // batch_size  # both drop the last short batch of an epoch
    trainers = build_racers(config, train, compute, workers, batch_size, epochs * steps_per_epoch)
    runtime = setup_runtime(compute, SEED)
    device = runtime.device
    probe = KnnProbe(train, test, config["evaluate"], runtime)
    assert {trainer.batch_size for trainer in trainers.values()} == {batch_size}
    initial_accuracy = probe.accuracy(trainers["ours"].modules[0])  # lightly's backbone starts the same

    curves = {name: [] for name in RACERS}
    clocks = {name: {"train": 0.0, "wall": 0.0} for name in RACERS}
    for epoch in range(1, epochs + 1):
        for name in RACERS:
            trainer, clock = trainers[name], clocks[name]
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps_per_epoch):
                trainer.step()
            synchronize(device)
            trained = time.perf_counter()
            knn_accuracy = probe.accuracy(trainer.modules[0])
            clock["train"] += trained - started
            clock["wall"] += time.perf_counter() - started  # its training and its own probes
            curves[name].append({"epoch": epoch, "knn_accuracy": knn_accuracy, "train_seconds": clock["train"],
                                 "wall_seconds": clock["wall"]})
            log(f"{name} epoch {epoch}/{epochs}: kNN accuracy {knn_accuracy:.4f}, {clock['train']:.1f} s training")

    settings = config["pretrain"]
    return {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "device_name": device_description(runtime), "threads": runtime.threads,
            "precision": str(runtime.autocast_dtype).replace("torch.", ""), "torch": torch.__version__,
            "lightly": lightly_version(), "python": platform.python_version(),
            **load.summary(), "raw_dir": str(raw_dir),
        },
        "settings": {"objective": objective, objective: settings[objective], "train_images": len(train.images),
                     "test_images": len(test.images), "epochs": epochs, "batch_size": batch_size,
                     "steps_per_epoch": steps_per_epoch, "lightly_workers": trainers["lightly"].workers,
                     "learning_rate": settings["learning_rate"], "weight_decay": settings["weight_decay"],
                     "warmup_steps": warmup_steps("pretrain", settings, epochs * steps_per_epoch),
                     "augment": settings["augment"],
                     "model": config["model"], "knn_k": probe.k, "knn_temperature": probe.temperature,
                     "memory_bank_images": len(train.images)},
        "initial_knn_accuracy": initial_accuracy,
        **race_summary(curves, target),
        "losses": {name: trainers[name].loss_name for name in RACERS},
    }


def race_summary(curves: dict, target: float = None) -> dict:
    """Final accuracies, the target (by default the lower final accuracy, which both reach), the first
    point of each curve at or above it (None if none) and the ratio of their training seconds."""
    finals = {name: curves[name][-1]["knn_accuracy"] for name in RACERS}
    target_given = target is not None
    target = target if target_given else min(finals.values())
    reached = {name: first_reaching(curves[name], target) for name in RACERS}
    ratio = (reached["lightly"]["train_seconds"] / reached["ours"]["train_seconds"]
             if all(reached.values()) else None)
    return {
        "implementations": {name: {"final_knn_accuracy": finals[name], "curve": curves[name]} for name in RACERS},
        "target": {"knn_accuracy": target, "source": "--target" if target_given else "lower final accuracy",
                   **reached},
        # Training seconds to the target, lightly's over ours: ours is faster when above 1.
        "time_ratio_lightly_over_ours": ratio,
    }


def race_table(results: dict) -> str:
    target = results["target"]
    rows = [f"| implementation | final kNN accuracy | epoch reaching {target['knn_accuracy']:.4f} | training s to it "
            "| training s, all epochs | wall s, with probes |", "|---|---:|---:|---:|---:|---:|"]
    for name in RACERS:  # ours first, whatever order the JSON keeps
        entry = results["implementations"][name]
        point, last = target[name], entry["curve"][-1]
        to_target = (f"{point['epoch']} | {point['train_seconds']:.1f}" if point else "not reached | –")
        rows.append(f"| {name} | {entry['final_knn_accuracy']:.4f} | {to_target} | {last['train_seconds']:.1f} | "
                    f"{last['wall_seconds']:.1f} |")
    settings, meta, ratio = results["settings"], results["meta"], results["time_ratio_lightly_over_ours"]
    epochs, workers = settings["epochs"], settings["lightly_workers"]
    rows.append("")
    rows.append(f"Target ({target['source']}): {target['knn_accuracy']:.4f}; lightly's training time to it over "
                "ours: " + (f"**{ratio:.2f}×** (ours is faster when above 1)." if ratio is not None
                            else "– (not reached by both)."))
    rows.append(f"{settings['objective']}, {settings['train_images']:,} train images (the kNN memory bank), "
                f"{settings['test_images']:,} test images, {epochs} epoch{'' if epochs == 1 else 's'} of "
                f"{settings['steps_per_epoch']} steps of {settings['batch_size']}; lightly's DataLoader with "
                f"{workers} worker{'' if workers == 1 else 's'}; kNN k={settings['knn_k']}, "
                f"T={settings['knn_temperature']}.")
    rows.append(f"`{meta['command']}` on {meta['date'][:10]}; {meta['device_name']}; {threads(meta['threads'])}, "
                f"autocast {meta['precision']}; torch {meta['torch']}, lightly {meta['lightly']}; "
                f"{machine_load(meta)}.")
    return "\n".join(rows)


def plot_race(results: dict, path) -> None:
    """Both curves, kNN accuracy against training seconds, from the shared initial weights at 0 s."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    target = results["target"]
    for name in RACERS:
        curve = results["implementations"][name]["curve"]
        line, = axes.plot([0.0] + [point["train_seconds"] for point in curve],
                          [results["initial_knn_accuracy"]] + [point["knn_accuracy"] for point in curve],
                          marker="o", label=name)
        if target[name]:
            axes.axvline(target[name]["train_seconds"], color=line.get_color(), linestyle=":", linewidth=1)
    axes.axhline(target["knn_accuracy"], color="grey", linestyle="--",
                 label=f"target {target['knn_accuracy']:.4f} ({target['source']})")
    settings = results["settings"]
    axes.set(xlabel="training seconds (probes excluded)", ylabel="kNN test accuracy",
             title=f"{settings['objective']} pretraining, {settings['train_images']:,} images, "
                   f"{results['meta']['device_name']}")
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
