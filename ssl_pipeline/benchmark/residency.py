"""Residency mode: training throughput of the default pretraining with its images on the device, in host
memory and memory-mapped on disk (config data.residency; ssl_pipeline/core/residency.py), as a ratio to
the device in one run.

Warm: the file in the page cache, the residencies measured in turn, `repetitions` times each, so that a
drift of the machine's speed spreads over all of them; each figure is the median repetition. Cold: before
each residency's first epoch, the file's pages are dropped from the page cache (posix_fadvise DONTNEED;
the share still cached is measured with mincore and reported), and the clock covers the arrays' setup
(reading the whole file, for device and host) and that epoch's steps.

The steps are the pipeline's: BatchOrder's order from the device generator, the residency's Batches,
contrastive_loss and AdamW, as pretrain.py runs them.
"""
import ctypes
import gc
import mmap
import os
import statistics
import time
from pathlib import Path

import numpy as np

from ssl_pipeline.benchmark.data import SEED, load_split
from ssl_pipeline.benchmark.trainers import pretraining_objective
from ssl_pipeline.core.data import BatchOrder, Normalizer, device_generator
from ssl_pipeline.core.models import build_encoder, prepare
from ssl_pipeline.core.residency import RESIDENCIES, ImageData
from ssl_pipeline.core.runtime import setup_runtime
from ssl_pipeline.core.training import Stopwatch, adamw, optimisation_step, warmup_cosine
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.stages.pretrain import contrastive_loss

LIBC = ctypes.CDLL(None, use_errno=True)


def cpu_model() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} CPUs"


def cached_share(path: Path) -> float:
    """Share of the file's pages in the page cache: mincore over a read-only map of it (libc's own mmap,
    since Python's read-only mmap gives no address)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    LIBC.mmap.restype = ctypes.c_void_p
    with open(path, "rb") as handle:
        base = LIBC.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(),
                         ctypes.c_long(0))
    try:
        if LIBC.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
    finally:
        LIBC.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))
    return sum(byte & 1 for byte in vector) / max(1, pages)


def drop_from_page_cache(path: Path) -> float:
    """Ask the kernel to drop the file's clean pages; -> the share still cached afterwards."""
    gc.collect()  # the maps of earlier measurements pin their pages
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())  # dirty pages cannot be dropped
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return cached_share(path)


def warm_page_cache(path: Path) -> float:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass
    return cached_share(path)


class PretrainingSteps:
    """The default pretraining's pieces with its images in one residency; run(steps) -> seconds."""

    def __init__(self, config: dict, images_path: Path, normalization: dict, residency: str, runtime):
        settings, device = config["pretrain"], runtime.device
        self.runtime, self.settings, self.device = runtime, settings, device
        started = time.perf_counter()
        self.images = ImageData([images_path], residency, device)
        self.setup_seconds = time.perf_counter() - started
        self.normalize = Normalizer(normalization, device)
        name = pretraining_objective(config)
        self.encoder = prepare(build_encoder(config["model"], self.images.shape[1]), device)
        self.objective = build_objective(name, self.encoder, settings[name]).to(device)
        self.optimizer = adamw(list(self.encoder.parameters()) + list(self.objective.parameters()), settings)
        self.scheduler = warmup_cosine(self.optimizer, 0, 10 ** 6)  # constant: speed does not depend on it
        self.generator = device_generator(device, SEED)
        self.order = BatchOrder(len(self.images), settings["batch_size"], self.generator, device)
        self.batches = self.images.batches(self.order)
        self.steps_done = 0

    def run(self, steps: int) -> float:
        clock = Stopwatch(self.device)
        for _ in range(steps):
            _, batch = self.batches.next()
            loss, _ = contrastive_loss(self.encoder, self.objective, self.normalize, batch, self.settings["augment"],
                                       self.generator, self.runtime)
            optimisation_step(loss, self.optimizer, self.scheduler)
            self.steps_done += 1
            self.objective.after_step(self.encoder, self.steps_done, 10 ** 6)
        return clock.seconds()

    def close(self) -> None:
        self.batches.close()
        self.images.close()


def residency_benchmark(config: dict, raw_dir, compute: dict, data_dir: Path, steps: int, warmup: int,
                        repetitions: int, cold_steps, images_limit=None, log=print) -> dict:
    """cold_steps: steps of the cold measurement (None: one epoch; 0: no cold measurement)."""
    runtime = setup_runtime({**compute, "compile": False}, SEED)
    train = load_split(raw_dir, config, "train", images_limit)
    data_dir.mkdir(parents=True, exist_ok=True)
    images_path = data_dir / "train_images.npy"
    np.save(images_path, train.images)
    normalization = normalization_statistics(train.images)
    batch = min(config["pretrain"]["batch_size"], len(train.images))
    results = {"images": len(train.images), "image_shape": list(train.images.shape[1:]), "file": str(images_path),
               "file_bytes": images_path.stat().st_size, "batch_size": batch, "device": str(runtime.device),
               "threads": runtime.threads, "steps": steps, "repetitions": repetitions, "warm": {}, "cold": {}}
    epoch = len(train.images) // batch
    cold_steps = epoch if cold_steps is None else cold_steps
    if cold_steps:  # the process's first steps (thread pools, allocator) must not count against the first residency
        warming = PretrainingSteps(config, images_path, normalization, "device", runtime)
        warming.run(warmup)
        warming.close()
        del warming
    for residency in RESIDENCIES if cold_steps else ():
        cached = drop_from_page_cache(images_path)
        trainer = PretrainingSteps(config, images_path, normalization, residency, runtime)
        seconds = trainer.run(cold_steps)
        trainer.close()
        results["cold"][residency] = {"page_cache_share_at_start": round(cached, 4), "steps": cold_steps,
                                      "setup_seconds": round(trainer.setup_seconds, 3),
                                      "images_per_second": round(cold_steps * batch / (trainer.setup_seconds + seconds), 1)}
        log(f"cold {residency}: {cached:.1%} cached at start, setup {trainer.setup_seconds:.2f} s, "
            f"{results['cold'][residency]['images_per_second']} images/s over setup and {cold_steps} steps")
        del trainer
    results["page_cache_share_warm"] = round(warm_page_cache(images_path), 4)
    trainers = {residency: PretrainingSteps(config, images_path, normalization, residency, runtime)
                for residency in RESIDENCIES}
    for trainer in trainers.values():
        trainer.run(warmup)
    seconds = {residency: [] for residency in RESIDENCIES}
    for repetition in range(repetitions):
        for residency, trainer in trainers.items():
            seconds[residency].append(trainer.run(steps))
            log(f"warm {residency}, repetition {repetition + 1}: {steps * batch / seconds[residency][-1]:.1f} images/s")
    device_rate = steps * batch / statistics.median(seconds["device"])
    for residency, times in seconds.items():
        rate = steps * batch / statistics.median(times)
        results["warm"][residency] = {"images_per_second": round(rate, 1), "ratio_to_device": round(rate / device_rate, 3),
                                      "seconds": [round(t, 3) for t in times]}
    for trainer in trainers.values():
        trainer.close()
    return results


def residency_table(results: dict) -> str:
    lines = [f"pretraining, {results['images']} images {results['image_shape']}, batch {results['batch_size']}, "
             f"{results['device']}, {results['threads']} threads",
             "| residency | warm images/s | ratio to device | cold: cached at start | cold images/s (setup + epoch) |",
             "|---|---|---|---|---|"]
    for residency, warm in results["warm"].items():
        cold = results["cold"].get(residency)
        cold_cells = (f"{cold['page_cache_share_at_start']:.1%} | {cold['images_per_second']}" if cold else "- | -")
        lines.append(f"| {residency} | {warm['images_per_second']} | {warm['ratio_to_device']:.3f} | {cold_cells} |")
    return "\n".join(lines)
