"""One measurement of a trainer's speed and memory, in a fresh process of its own."""
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
import traceback
from pathlib import Path

import psutil
import torch

from ssl_pipeline.benchmark.data import MIB, RSS_SAMPLE_SECONDS, SEED, Plan, load_split
from ssl_pipeline.benchmark.trainers import build_trainer, parameter_count, pretraining_objective
from ssl_pipeline.core.roofline import count_flops, synchronize
from ssl_pipeline.core.runtime import available_cpus, setup_runtime


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
    # build_trainer hands "lightly" to peer.build_lightly_trainer, which imports lightly in this process.
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
