"""Where and how training runs: device, precision, threads and seeds, decided once and logged."""
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


class GpuUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype  # torch.float32 means autocast is off
    threads: int

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype != torch.float32)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def select_device(requested: str, require_gpu: bool) -> torch.device:
    """`auto` takes a CUDA device when one is usable. torch sees only the GPUs that
    CUDA_VISIBLE_DEVICES names, so a scheduler's GPU assignment is honoured without extra work."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        if requested in ("auto", "cuda") or requested.startswith("cuda"):
            return torch.device("cuda" if requested == "auto" else requested)
        return torch.device("cpu")
    wants_gpu = requested.startswith("cuda") or require_gpu
    if wants_gpu:
        reason = (f"CUDA_VISIBLE_DEVICES={visible!r} but torch finds no usable CUDA device"
                  if visible is not None else "torch finds no CUDA device")
        if require_gpu:
            raise GpuUnavailable(f"a GPU is required (config key compute.require_gpu) but {reason}")
        log.warning("a GPU was requested (compute.device=%s) but %s; falling back to the CPU",
                    requested, reason)
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """bf16 pays off on CPUs with AMX or AVX512-BF16; elsewhere it is emulated and slower than fp32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def select_precision(requested: str, device: torch.device) -> torch.dtype:
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return torch.bfloat16 if fast else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(compute: dict, seed: int) -> Runtime:
    """compute: the config's `compute` section (device, require_gpu, precision, threads)."""
    device = select_device(compute["device"], compute["require_gpu"])
    threads = max(1, min(compute["threads"], available_cpus()))
    torch.set_num_threads(threads)
    seed_everything(seed)
    runtime = Runtime(device, select_precision(compute["precision"], device), threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log.info("device %s (%s), autocast %s, %d threads, torch %s, seed %d", device, name,
             str(runtime.autocast_dtype).replace("torch.", ""), threads, torch.__version__, seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return runtime
