"""Profile mode: torch.profiler's table of one implementation's steps."""
import time

import torch

from ssl_pipeline.benchmark.data import SEED, Plan, load_split
from ssl_pipeline.benchmark.speed import threads
from ssl_pipeline.benchmark.trainers import build_trainer
from ssl_pipeline.core.roofline import synchronize
from ssl_pipeline.core.runtime import setup_runtime


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
