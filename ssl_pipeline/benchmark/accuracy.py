"""Time-to-accuracy mode: supervised training from scratch until test accuracy reaches targets."""
import time
from datetime import datetime, timezone

import torch

from ssl_pipeline.benchmark.data import SEED, endless, load_split
from ssl_pipeline.benchmark.measure import device_description
from ssl_pipeline.benchmark.speed import MachineLoad, machine_load, threads
from ssl_pipeline.core.data import Normalizer, device_generator, shuffled_batches
from ssl_pipeline.stages.finetune import supervised_loss
from ssl_pipeline.core.inference import accuracy
from ssl_pipeline.core.models import Classifier, build_encoder, prepare
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.core.roofline import synchronize
from ssl_pipeline.core.runtime import setup_runtime
from ssl_pipeline.core.training import adamw, optimisation_step, warmup_cosine


# ---------------------------------------------------------------------------------------------------
# Time-to-accuracy mode
# ---------------------------------------------------------------------------------------------------

def time_to_accuracy(config: dict, raw_dir, compute: dict, targets, epochs: int, time_limit: float,
                     evaluations_per_epoch: int, images: int = None, batch_size: int = None, log=print) -> dict:
    """Our fine-tuning step, from scratch, on the whole training split (config `finetune` and `model`),
    with a warm-up + cosine schedule over `epochs`. Test accuracy is measured `evaluations_per_epoch`
    times per epoch with the clock stopped; training stops once every target is reached, after
    `epochs`, or at the first evaluation past `time_limit` seconds of training."""
    load = MachineLoad()
    setup_started = time.perf_counter()
    # Eager: compiling would count as training time (the benchmark's speed mode reports it separately).
    runtime = setup_runtime({**compute, "compile": False}, SEED)
    device = runtime.device
    settings = config["finetune"]
    train, test = load_split(raw_dir, config, "train", images), load_split(raw_dir, config, "test", images)
    train_images = torch.from_numpy(train.images).to(device)  # uint8 (N, C, H, W), on the device once
    train_labels = torch.from_numpy(train.labels).to(device)
    test_images = torch.from_numpy(test.images).to(device)
    test_labels = torch.from_numpy(test.labels).to(device)
    normalize = Normalizer(normalization_statistics(train.images), device)
    num_classes = int(train.labels.max()) + 1
    model = prepare(Classifier(build_encoder(config["model"], train.images.shape[1]), num_classes), device)
    batch_size = min(batch_size or settings["batch_size"], len(train.images))
    steps_per_epoch = len(train.images) // batch_size
    total_steps = epochs * steps_per_epoch
    optimizer = adamw(model.parameters(), settings)
    scheduler = warmup_cosine(optimizer, int(settings["warmup_fraction"] * total_steps), total_steps)
    generator = device_generator(device, SEED)
    evaluation_steps = [round(index * steps_per_epoch / evaluations_per_epoch)
                        for index in range(1, epochs * evaluations_per_epoch + 1)]
    synchronize(device)
    setup_seconds = time.perf_counter() - setup_started

    curve, reached = [], {}
    train_seconds, wall_started = 0.0, time.perf_counter()
    batches = endless(lambda: shuffled_batches(len(train_images), batch_size, generator, device))
    step = 0
    for evaluation_step in evaluation_steps:
        synchronize(device)
        started = time.perf_counter()
        model.train()
        for step in range(step + 1, evaluation_step + 1):
            index = next(batches)
            loss = supervised_loss(model, normalize, train_images[index], train_labels[index], settings,
                                   generator, runtime)
            optimisation_step(loss, optimizer, scheduler)
        synchronize(device)
        train_seconds += time.perf_counter() - started
        test_accuracy = accuracy(model, test_images, test_labels, normalize, runtime)
        point = {"epochs": step / steps_per_epoch, "test_accuracy": test_accuracy,
                 "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - wall_started}
        curve.append(point)
        log(f"epoch {point['epochs']:.2f}: test accuracy {test_accuracy:.4f}, {train_seconds:.1f} s training")
        for target in targets:
            if target not in reached and test_accuracy >= target:
                reached[target] = point
        if len(reached) == len(targets):
            break
        if train_seconds > time_limit:
            log(f"stopping: {train_seconds:.0f} s of training is past --time-limit {time_limit:g} s")
            break
    return {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "device_name": device_description(runtime), "threads": runtime.threads,
            "precision": str(runtime.autocast_dtype).replace("torch.", ""), "torch": torch.__version__,
            **load.summary(), "raw_dir": str(raw_dir),
        },
        "settings": {"train_images": len(train.images), "test_images": len(test.images),
                     "batch_size": batch_size, "schedule_epochs": epochs, "time_limit_seconds": time_limit,
                     "evaluations_per_epoch": evaluations_per_epoch, "learning_rate": settings["learning_rate"],
                     "augment": settings["augment"], "model": config["model"]},
        "setup_seconds": setup_seconds,
        "targets": [{"target": target, "reached": target in reached, **reached.get(target, {})}
                    for target in targets],
        "curve": curve,
    }


def accuracy_table(results: dict) -> str:
    rows = ["| target test accuracy | reached | epochs | training s | wall s (with evaluations) |",
            "|---:|---|---:|---:|---:|"]
    for target in results["targets"]:
        if target["reached"]:
            rows.append(f"| {target['target']:.2f} | yes | {target['epochs']:.2f} | "
                        f"{target['train_seconds']:.1f} | {target['wall_seconds']:.1f} |")
        else:
            last = results["curve"][-1]
            best = max(point["test_accuracy"] for point in results["curve"])
            rows.append(f"| {target['target']:.2f} | no: best {best:.4f} in {last['epochs']:.2f} epochs "
                        "| – | – | – |")
    meta = results["meta"]
    rows.append("")
    rows.append(f"`{meta['command']}` on {meta['date'][:10]}; {meta['device_name']}; "
                f"{threads(meta['threads'])}, autocast {meta['precision']}; {machine_load(meta)}.")
    return "\n".join(rows)
