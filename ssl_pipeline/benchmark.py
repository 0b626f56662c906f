"""Training speed of our pipeline against the usual PyTorch recipe (ssl_pipeline/reference.py).

    python -m ssl_pipeline.benchmark speed --out results/performance/speed.json [--tiny] [--device cuda]
    python -m ssl_pipeline.benchmark time-to-accuracy --out results/performance/time_to_accuracy.json
    python -m ssl_pipeline.benchmark profile --stage pretrain --implementation ours --out profile.txt

speed: images per second of one optimisation step of pretraining (two views, contrastive loss;
both views count) and of fine-tuning, for ours and for the reference on the same model, loss, batch
size, device, precision and thread count, built from config/config.yaml. Each measurement runs in a
fresh process of its own, so its peak memory is its own. The reference runs once per
DataLoader worker count in --workers, and the fastest is the one we compare with.
time-to-accuracy: supervised training from scratch on the whole training set with our pipeline, until
test accuracy first reaches each target.
profile: torch.profiler's table of one implementation's steps.
"""
import argparse
import importlib.metadata
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch

from ssl_pipeline.artifacts import write_json, write_text
from ssl_pipeline.config import load_config as config_with_overrides
from ssl_pipeline.data import Normalizer, device_generator, shuffled_batches
from ssl_pipeline.finetune import supervised_loss
from ssl_pipeline.inference import accuracy
from ssl_pipeline.models import Classifier, build_encoder, prepare
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.datasets import format_options, read_dataset
from ssl_pipeline.datasets.idx import load_split as read_split
from ssl_pipeline.preprocess import normalization_statistics
from ssl_pipeline.pretrain import contrastive_loss
from ssl_pipeline.roofline import count_flops, describe_flops, efficiency, measure_roof, synchronize
from ssl_pipeline.runtime import available_cpus, setup_runtime
from ssl_pipeline.training import adamw, optimisation_step, warmup_cosine

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "config" / "config.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DOWNLOADED = REPO / "results" / "raw"  # where the pipeline's download rule puts the IDX files
STAGES = ("pretrain", "finetune")
IMPLEMENTATIONS = ("ours", "reference")
MIB = 2 ** 20
SEED = 0
# Speed does not depend on the learning rate; a schedule this long keeps it at its peak while we time.
CONSTANT_SCHEDULE_STEPS = 10 ** 6
RSS_SAMPLE_SECONDS = 0.05


@dataclass(frozen=True)
class Plan:
    """How much to measure. images: training images used (None: all); batch_size: None keeps the config's."""
    repetitions: int = 3
    warmup_steps: int = 4
    repetition_seconds: float = 5.0  # each timed repetition runs about this long...
    min_steps: int = 3  # ...and at least this many steps
    images: int = None
    batch_size: int = None
    roof_seconds: float = 2.0  # timing of each roof operation (ssl_pipeline/roofline.py)


TINY = Plan(repetitions=3, warmup_steps=2, repetition_seconds=0.1, min_steps=2, images=512, batch_size=32,
            roof_seconds=0.1)


# ---------------------------------------------------------------------------------------------------
# Config and data
# ---------------------------------------------------------------------------------------------------

def load_config(override_paths=()) -> dict:
    return config_with_overrides(BASE_CONFIG, override_paths, SCHEMA)


def default_raw_dir(config: dict) -> Path:
    """The pipeline's downloaded files if present, else the first local-directory mirror that has them."""
    dataset = config["dataset"]
    name = dataset["files"]["train_images"]["name"] if dataset["format"] == "idx" else dataset["archive"]["name"]
    for directory in [DOWNLOADED] + [Path(mirror) for mirror in config["dataset"]["mirrors"]]:
        if any((directory / candidate).is_file() for candidate in (name, name + ".gz")):
            return directory
    raise FileNotFoundError(f"no {name}[.gz] in {DOWNLOADED} or in a local mirror of config key "
                            "dataset.mirrors; run the pipeline's download step or pass --raw-dir")


def raw_path(directory: Path, name: str) -> Path:
    """An IDX file as a mirror holds it: `<name>.gz` or `<name>`."""
    compressed = directory / f"{name}.gz"
    return compressed if compressed.is_file() else directory / name


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


def load_split(raw_dir, config: dict, split: str, limit=None) -> Split:
    """One split of the raw data: IDX files as a mirror holds them, or any other format's archive."""
    dataset = config["dataset"]
    if dataset["format"] == "idx":
        files = dataset["files"]
        images, labels = read_split(raw_path(Path(raw_dir), files[f"{split}_images"]["name"]),
                                    raw_path(Path(raw_dir), files[f"{split}_labels"]["name"]))
    else:
        data = read_dataset(dataset["format"], {"archive": Path(raw_dir) / dataset["archive"]["name"]},
                            format_options(dataset))
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    return Split(np.ascontiguousarray(images[:limit]), labels[:limit].astype(np.int64))


def endless(make_iterable):
    while True:
        yield from make_iterable()


# ---------------------------------------------------------------------------------------------------
# The measured steps: one optimisation step of a stage, ours or the reference
# ---------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    stage: str
    implementation: str
    workers: int  # DataLoader worker processes (0 for ours, which has no loader)
    batch_size: int  # images drawn per step
    images_per_step: int  # images the model sees per step: both views count in pretraining
    modules: tuple  # what the step trains: (encoder, objective) or (classifier,)
    loss_name: str
    # () -> None: one optimisation step, in three phases the profiler sees (torch.profiler labels):
    # "batch" takes the next batch (the reference's loader loads and augments it here), "forward" runs
    # the model and the loss (ours augments here, on the device), "update" is backward and AdamW.
    step: object
    loader: object = None  # the reference's DataLoader


def pretraining_objective(config: dict) -> str:
    """The objective a pretraining measurement uses: pretrain.objective where measured_steps set it,
    else the first of config pretrain.objectives."""
    return config["pretrain"].get("objective", config["pretrain"]["objectives"][0])


def build_trainer(stage: str, implementation: str, config: dict, train: Split, runtime, workers: int = 0,
                  batch_size: int = None) -> Trainer:
    """Model, loss, optimiser and batch size come from the config and are built the same way for both
    implementations (and, after the same seed, with the same initial weights); only how batches are
    made differs."""
    if stage not in STAGES or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"stage must be one of {STAGES} and implementation one of {IMPLEMENTATIONS}")
    device = runtime.device
    settings = config[stage]
    in_channels, image_shape = train.images.shape[1], train.images.shape[1:]
    if stage == "pretrain":
        encoder = prepare(build_encoder(config["model"], in_channels), device)
        name = pretraining_objective(config)
        objective = build_objective(name, encoder, settings[name]).to(device)
        modules, loss_name = (encoder, objective), f"{name} on two views"
    else:
        num_classes = int(train.labels.max()) + 1
        model = prepare(Classifier(build_encoder(config["model"], in_channels), num_classes,
                                   freeze_encoder=settings["mode"] == "linear_probe"), device)
        modules = (model,)
        loss_name = f"cross entropy, label smoothing {settings['label_smoothing']}"
    for module in modules:
        module.train()
    optimizer = adamw([p for module in modules for p in module.parameters()], settings)
    scheduler = warmup_cosine(optimizer, 0, CONSTANT_SCHEDULE_STEPS)
    batch_size = min(batch_size or settings["batch_size"], len(train.images))
    pixel_statistics = normalization_statistics(train.images)
    mean, std = pixel_statistics["mean"], pixel_statistics["std"]
    views = 2 if stage == "pretrain" else 1
    trainer = Trainer(stage, implementation, workers if implementation == "reference" else 0, batch_size,
                      views * batch_size, modules, loss_name, step=None)

    if implementation == "ours":
        # The pipeline's loop: the dataset on the device as uint8, once; batches cut and augmented there.
        images = torch.from_numpy(train.images).to(device)  # uint8 (N, C, H, W)
        labels = torch.from_numpy(train.labels).to(device)
        normalize = Normalizer(pixel_statistics, device)
        generator = device_generator(device, SEED)
        batches = endless(lambda: shuffled_batches(len(images), batch_size, generator, device))

        def batch_loss():
            with torch.profiler.record_function("batch"):
                index = next(batches)
            with torch.profiler.record_function("forward"):
                if stage == "pretrain":
                    return contrastive_loss(encoder, objective, normalize, images[index], settings["augment"],
                                            generator, runtime)[0]
                return supervised_loss(model, normalize, images[index], labels[index], settings, generator,
                                       runtime)
    else:
        # The tutorial recipe: per-sample PIL transforms in DataLoader workers. Imported here so that
        # torchvision and PIL count in the reference's memory figures, not in ours.
        from ssl_pipeline import reference

        size = list(image_shape[1:])
        if stage == "pretrain":
            view = reference.contrastive_transform(settings["augment"], mean, std, size, in_channels)
            transform = reference.TwoViews(view)
        else:
            transform = reference.supervised_transform(settings["augment"], mean, std, size)
        dataset = reference.TutorialDataset(train.images, train.labels, transform)
        trainer.loader = reference.data_loader(dataset, batch_size, workers, device)
        batches = endless(lambda: trainer.loader)

        def batch_loss():
            with torch.profiler.record_function("batch"):
                inputs, targets = next(batches)
            with torch.profiler.record_function("forward"):
                if stage == "pretrain":
                    return reference.contrastive_loss(encoder, objective, inputs, runtime)
                return reference.supervised_loss(model, inputs, targets, settings["label_smoothing"], runtime)

    def step():
        loss = batch_loss()
        with torch.profiler.record_function("update"):
            optimisation_step(loss, optimizer, scheduler)
            if stage == "pretrain":
                objective.after_step(encoder, 1, CONSTANT_SCHEDULE_STEPS)  # momentum targets, where any

    trainer.step = step
    return trainer


def parameter_count(trainer: Trainer) -> int:
    return sum(p.numel() for module in trainer.modules for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# One measurement, in a process of its own
# ---------------------------------------------------------------------------------------------------

def device_description(runtime) -> str:
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name(runtime.device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor() or 'CPU'}, {available_cpus()} CPUs available"


def tree_memory(pid: int, field: str) -> int:
    """Summed `field` (rss or pss) of a process and its descendants (the DataLoader workers), in bytes."""
    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            info = process.memory_full_info() if field == "pss" else process.memory_info()
            total += getattr(info, field)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(stage, implementation, workers, config, raw_dir, compute, plan: Plan) -> dict:
    """Build one trainer, count its FLOPs on one eager step, compile it where compute["compile"] says
    so, warm it up, and time `plan.repetitions` runs of the same number of steps."""
    runtime = setup_runtime(compute, SEED)
    device = runtime.device
    train = load_split(raw_dir, config, "train", plan.images)
    trainer = build_trainer(stage, implementation, config, train, runtime, workers, plan.batch_size)

    # Warm-up: worker start-up, allocator and cudnn autotuning. Its last steps size the repetitions.
    trainer.step()
    flops_per_image = count_flops(trainer.step) / trainer.images_per_step  # on the eager modules
    compile_seconds = None
    if runtime.compile:
        synchronize(device)
        start = time.perf_counter()
        runtime.compile_modules(*trainer.modules)
        trainer.step()  # compiles; later steps may recompile once more (e.g. after the first backward)
        trainer.step()
        synchronize(device)
        compile_seconds = time.perf_counter() - start
    synchronize(device)
    start = time.perf_counter()
    for _ in range(plan.warmup_steps - 1):
        trainer.step()
    synchronize(device)
    seconds_per_step = (time.perf_counter() - start) / max(1, plan.warmup_steps - 1)
    steps = max(plan.min_steps, math.ceil(plan.repetition_seconds / seconds_per_step))

    rates = []
    for _ in range(plan.repetitions):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        synchronize(device)
        rates.append(steps * trainer.images_per_step / (time.perf_counter() - start))

    return {
        "stage": stage,
        "objective": pretraining_objective(config) if stage == "pretrain" else None,
        "implementation": implementation,
        "compiled": runtime.compile,
        # The first two compiled steps, compilation included; not in the timed repetitions.
        "compile_seconds": compile_seconds,
        "workers": trainer.workers,
        "batch_size": trainer.batch_size,
        "images_per_step": trainer.images_per_step,
        "parameters": parameter_count(trainer),
        "loss": trainer.loss_name,
        "steps_per_repetition": steps,
        "images_per_second": statistics.mean(rates),
        "images_per_second_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "repetitions": rates,
        "flops_per_image": flops_per_image,
        # Kernel high-water mark of the training process alone (ru_maxrss is KiB on Linux).
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
        # Proportional set size of the training process and its workers, after the timed runs: each
        # shared page (torch's libraries, the copy-on-write dataset) is split among its sharers.
        "host_pss_mib": tree_memory(os.getpid(), "pss") / MIB,
        "cuda_peak_allocated_mib": (torch.cuda.max_memory_allocated(device) / MIB
                                    if device.type == "cuda" else None),
        "device": str(device),
        "device_name": device_description(runtime),
        "threads": runtime.threads,
        "precision": str(runtime.autocast_dtype).replace("torch.", ""),
    }


def measurement_process(connection, *arguments) -> None:
    try:
        connection.send(measure(*arguments))
    except BaseException:
        connection.send({"error": traceback.format_exc()})
    finally:
        connection.close()


def measure_in_child(stage, implementation, workers, config, raw_dir, compute, plan: Plan) -> dict:
    """Run `measure` in a fresh Python process while sampling, from here, the summed RSS of it and its
    workers. Spawned, not forked: a forked child would share this process's pages (torch's libraries),
    which would hide part of its memory from the figures."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=measurement_process,
                            args=(sender, stage, implementation, workers, config, raw_dir, compute, plan))
    child.start()
    sender.close()
    peak_rss = 0
    while not receiver.poll(RSS_SAMPLE_SECONDS):
        peak_rss = max(peak_rss, tree_memory(child.pid, "rss"))
    try:
        result = receiver.recv()
    except EOFError:  # it died before sending anything
        result = None
    child.join()
    if result is None:
        result = {"error": f"the measuring process died with exit code {child.exitcode}"}
    if "error" in result:
        raise RuntimeError(f"measuring {stage} {implementation} (workers={workers}) failed:\n{result['error']}")
    # Sampled every RSS_SAMPLE_SECONDS; a page shared by the workers counts once per process.
    result["host_peak_rss_mib"] = max(peak_rss / MIB, result["process_peak_rss_mib"])
    return result


# ---------------------------------------------------------------------------------------------------
# Speed mode
# ---------------------------------------------------------------------------------------------------

class MachineLoad:
    """CPU seconds that processes other than this one and its children used while it ran: a direct
    measure of the noise that other work on the machine added (the load average lags by minutes)."""

    def __init__(self):
        self.load_before, self.started = os.getloadavg(), time.perf_counter()
        self.busy, self.steal, self.own = self.readings()

    @staticmethod
    def readings():
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return busy, getattr(times, "steal", 0.0), own

    def summary(self) -> dict:
        busy, steal, own = self.readings()
        return {"seconds": time.perf_counter() - self.started,
                "load_average_before": list(self.load_before), "load_average_after": list(os.getloadavg()),
                "other_processes_cpu_seconds": max(0.0, (busy - self.busy) - (own - self.own)),
                "steal_cpu_seconds": steal - self.steal}


def default_worker_counts() -> list:
    """0 (loading in the training process), 1, half and all of the CPUs: workers compete with the
    training threads for the same cores, so more is not always faster."""
    cpus = available_cpus()
    return sorted({0, 1, max(1, cpus // 2), cpus})


def measured_steps(config: dict, stages) -> list:
    """(name, stage, config) per measured step: pretraining once per objective of config
    pretrain.objectives (both implementations with the same objective), fine-tuning once."""
    steps = []
    for stage in stages:
        if stage != "pretrain":
            steps.append((stage, stage, config))
            continue
        for objective in config["pretrain"]["objectives"]:
            steps.append((f"pretrain {objective}", stage,
                          {**config, "pretrain": {**config["pretrain"], "objective": objective}}))
    return steps


def machine_roof(compute: dict, plan: Plan, log=print) -> dict:
    """The convolution and matmul roof on the measurements' device, threads and precision."""
    runtime = setup_runtime({**compute, "compile": False}, SEED)
    log(f"roof: convolution and matmul, {runtime.device}, {threads(runtime.threads)}")
    return measure_roof(runtime.device, runtime.autocast_dtype, plan.roof_seconds)


def add_efficiency(run: dict, roof: dict) -> dict:
    return {**run, **efficiency(run["flops_per_image"], run["images_per_second"], roof)}


def speed(config: dict, raw_dir, compute: dict, plan: Plan, worker_counts, stages=STAGES, log=print,
          compiled=True) -> dict:
    """Every measured step eager ("ours"), compiled ("ours, compiled", unless compiled=False) and as the
    reference with each worker count; each with its FLOPs and its fraction of the roof measured first."""
    load = MachineLoad()
    roof = machine_roof(compute, plan, log)
    results = {}
    eager, compile_on = {**compute, "compile": False}, {**compute, "compile": True}
    for name, stage, step_config in measured_steps(config, stages):
        log(f"{name}: ours")
        ours = add_efficiency(measure_in_child(stage, "ours", 0, step_config, raw_dir, eager, plan), roof)
        entry = {"ours": ours}
        if compiled:
            log(f"{name}: ours, compiled")
            entry["ours_compiled"] = add_efficiency(
                measure_in_child(stage, "ours", 0, step_config, raw_dir, compile_on, plan), roof)
        candidates = []
        for workers in worker_counts:
            log(f"{name}: reference, {workers} DataLoader workers")
            candidates.append(add_efficiency(
                measure_in_child(stage, "reference", workers, step_config, raw_dir, eager, plan), roof))
        best = max(candidates, key=lambda candidate: candidate["images_per_second"])
        entry.update({"reference": best, "reference_candidates": candidates,
                      "speedup": ours["images_per_second"] / best["images_per_second"]})
        if compiled:
            entry["compiled_speedup"] = entry["ours_compiled"]["images_per_second"] / best["images_per_second"]
        results[name] = entry
    first = next(iter(results.values()))["ours"]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": first["device"],
        "device_name": first["device_name"],
        "threads": first["threads"],
        "precision": first["precision"],
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "python": platform.python_version(),
        **load.summary(),
        "raw_dir": str(raw_dir),
        "plan": plan.__dict__,
        "worker_counts": list(worker_counts),
    }
    return {"meta": meta, "roof": roof, "stages": results}


def machine_load(meta: dict) -> str:
    return (f"load average {meta['load_average_before'][0]:.2f} before; other processes used "
            f"{meta['other_processes_cpu_seconds']:.0f} CPU s during the {meta['seconds']:.0f} s run")


def threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def implementation_name(run: dict) -> str:
    if run["implementation"] == "ours":
        compiled = f", compiled ({run['compile_seconds']:.0f} s to compile)" if run["compiled"] else ""
        return f"ours: uint8 on device, batched augmentation{compiled}"
    workers = run["workers"]
    return f"reference: PIL + DataLoader, {workers} worker{'' if workers == 1 else 's'}"


def speed_table(results: dict) -> str:
    """Markdown: one row per measurement; the speed-up is over the fastest reference setting, and the
    roof is the convolution's of ssl_pipeline/roofline.py, measured in the same run."""
    rows = ["| step | implementation | images/s (mean ± sd) | FLOPs/image | TFLOP/s | % of conv roof "
            "| peak RSS MiB | PSS MiB | CUDA peak MiB | speed-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, entry in results["stages"].items():
        label = "fine-tuning" if stage == "finetune" else f"pretraining {stage.split()[1]} (2 views/image)"
        best = entry["reference"]
        runs = [entry["ours"]] + ([entry["ours_compiled"]] if "ours_compiled" in entry else [])
        for run in runs + entry["reference_candidates"]:
            speedup = run["images_per_second"] / best["images_per_second"]
            speedup = "1.00× (fastest)" if run is best else \
                f"**{speedup:.2f}×**" if run["implementation"] == "ours" else f"{speedup:.2f}×"
            cuda = "–" if run["cuda_peak_allocated_mib"] is None else f"{run['cuda_peak_allocated_mib']:.0f}"
            rows.append(f"| {label} | {implementation_name(run)} | {run['images_per_second']:,.0f} ± "
                        f"{run['images_per_second_std']:,.0f} | {describe_flops(run['flops_per_image'])} | "
                        f"{run['tflops']:.3f} | {100 * run['fraction_of_conv_roof']:.0f} % | "
                        f"{run['host_peak_rss_mib']:.0f} | {run['host_pss_mib']:.0f} | {cuda} | {speedup} |")
    meta, roof = results["meta"], results["roof"]
    rows.append("")
    rows.append(f"Roof ({roof['precision']}, {threads(roof['threads'])}): convolution {roof['conv_shape']} "
                f"{roof['conv_tflops']:.3f} TFLOP/s; matmul {roof['matmul_shape']} {roof['matmul_tflops']:.3f} "
                "TFLOP/s. FLOPs: forward and backward of model and loss (torch.utils.flop_counter).")
    rows.append(f"`{meta['command']}` on {meta['date'][:10]}; {meta['device_name']}; "
                f"{threads(meta['threads'])}, autocast {meta['precision']}; torch {meta['torch']}; "
                f"{machine_load(meta)}.")
    return "\n".join(rows)


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
    runtime = setup_runtime(compute, SEED)
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
    runtime.compile_modules(model)  # config compute.compile; its first steps' compilation counts as training
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


# ---------------------------------------------------------------------------------------------------
# Profile mode
# ---------------------------------------------------------------------------------------------------

def profile(config: dict, raw_dir, compute: dict, stage: str, implementation: str, workers: int, steps: int,
            plan: Plan) -> str:
    """torch.profiler's operator table over `steps` steps after warm-up, with the time per step in each
    phase of Trainer.step. Work in DataLoader worker processes is invisible to it; in the training process
    it shows as the wait inside `batch`. On CUDA the phases measure host time (kernels run
    asynchronously) and the table is sorted by device time."""
    runtime = setup_runtime(compute, SEED)
    train = load_split(raw_dir, config, "train", plan.images)
    trainer = build_trainer(stage, implementation, config, train, runtime, workers, plan.batch_size)
    for _ in range(plan.warmup_steps):
        trainer.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        synchronize(runtime.device)
        seconds = time.perf_counter() - started
    events = {event.key: event for event in profiler.key_averages()}
    step_ms = 1000 * seconds / steps
    lines = [f"{stage} {implementation} (workers={trainer.workers}), {steps} steps of "
             f"{trainer.images_per_step} images, {runtime.device}, {threads(runtime.threads)}, autocast "
             f"{runtime.autocast_dtype}: {step_ms:.1f} ms per step (profiled)"]
    for phase in ("batch", "forward", "update"):  # the record_function labels of Trainer.step
        milliseconds = events[phase].cpu_time_total / 1000 / steps
        lines.append(f"  {phase:<8} {milliseconds:8.1f} ms per step, {100 * milliseconds / step_ms:5.1f}%")
    sort = "self_device_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    return "\n".join(lines) + "\n" + profiler.key_averages().table(sort_by=sort, row_limit=30)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    def common(mode):
        mode.add_argument("--configfile", action="append", default=[],
                          help="override file merged over config/config.yaml (repeatable), as for snakemake")
        mode.add_argument("--raw-dir", type=Path, default=None,
                          help="directory with the IDX files (.gz or not); default: results/raw, else the "
                               "first local mirror in config key dataset.mirrors")
        mode.add_argument("--device", default=None,
                          help="auto | cpu | cuda | cuda:N (default: config compute.device)")
        mode.add_argument("--threads", type=int, default=None,
                          help="torch threads (default: config compute.threads, at most the CPUs available)")
        mode.add_argument("--tiny", action="store_true", help=f"a few steps on {TINY.images} images, for CI")

    speed_mode = modes.add_parser("speed", help="images/s and memory of ours and the reference")
    common(speed_mode)
    speed_mode.add_argument("--out", type=Path, required=True, help="JSON of every figure")
    speed_mode.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    speed_mode.add_argument("--workers", type=int, nargs="+", default=None,
                            help="DataLoader worker counts to try for the reference; the fastest counts "
                                 f"(default {default_worker_counts()} here; --tiny: 1)")
    speed_mode.add_argument("--no-compiled", dest="compiled", action="store_false",
                            help="leave out the row of ours compiled with torch.compile")
    speed_mode.add_argument("--repetitions", type=int, default=Plan.repetitions)
    speed_mode.add_argument("--repetition-seconds", type=float, default=Plan.repetition_seconds,
                            help="length of each timed repetition")

    accuracy_mode = modes.add_parser("time-to-accuracy", help="wall time until test accuracy reaches targets")
    common(accuracy_mode)
    accuracy_mode.add_argument("--out", type=Path, required=True)
    accuracy_mode.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.92])
    accuracy_mode.add_argument("--epochs", type=int, default=None,
                               help="length of the learning-rate schedule (default 12; --tiny: 1)")
    accuracy_mode.add_argument("--time-limit", type=float, default=float("inf"),
                               help="stop at the first evaluation after this many seconds of training")
    accuracy_mode.add_argument("--evaluations-per-epoch", type=int, default=1)

    profile_mode = modes.add_parser("profile", help="torch.profiler table of one implementation's steps")
    common(profile_mode)
    profile_mode.add_argument("--out", type=Path, required=True, help="text file for the table")
    profile_mode.add_argument("--stage", choices=STAGES, required=True)
    profile_mode.add_argument("--implementation", choices=IMPLEMENTATIONS, required=True)
    profile_mode.add_argument("--workers", type=int, default=0)
    profile_mode.add_argument("--steps", type=int, default=10)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m ssl_pipeline.benchmark", *argv])
    config = load_config(args.configfile)
    raw_dir = args.raw_dir or default_raw_dir(config)
    compute = dict(config["compute"])
    compute.update({key: value for key, value in (("device", args.device), ("threads", args.threads)) if value})
    plan = TINY if args.tiny else Plan()
    log = lambda message: print(message, file=sys.stderr, flush=True)

    if args.mode == "speed":
        plan = dataclasses.replace(plan, repetitions=args.repetitions, repetition_seconds=(
            plan.repetition_seconds if args.tiny else args.repetition_seconds))
        workers = args.workers or ([1] if args.tiny else default_worker_counts())
        results = speed(config, raw_dir, compute, plan, workers, tuple(args.stages), log, args.compiled)
        results["meta"]["command"] = command
        write_json(args.out, results)
        print(speed_table(results))
    elif args.mode == "time-to-accuracy":
        epochs = args.epochs or (1 if args.tiny else 12)
        results = time_to_accuracy(config, raw_dir, compute, sorted(args.targets), epochs, args.time_limit,
                                   args.evaluations_per_epoch, plan.images and 4 * plan.images, plan.batch_size,
                                   log)
        results["meta"]["command"] = command
        write_json(args.out, results)
        print(accuracy_table(results))
    else:
        table = profile(config, raw_dir, compute, args.stage, args.implementation, args.workers, args.steps,
                        plan)
        write_text(args.out, table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
