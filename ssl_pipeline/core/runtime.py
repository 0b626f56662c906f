"""Where and how training runs: device, precision, threads and seeds, decided once and logged."""
import fcntl
import logging
import os
import random
import shutil
import tempfile
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
    compile: bool = False  # torch.compile the training modules (config compute.compile)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype != torch.float32)

    def compile_modules(self, *modules) -> None:
        """Compile each module in place (nn.Module.compile), where this runtime compiles: its parameters,
        state_dict keys and checkpoints stay as they are, and data-parallel wrapping works as before."""
        if self.compile:
            for module in modules:
                module.compile()


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpus_named_by(visible) -> bool:
    """Whether CUDA_VISIBLE_DEVICES (None when unset) hands this process any GPU: schedulers such as
    Slurm set it to the GPUs a job was granted, and '' or '-1' hide every GPU."""
    return visible is not None and visible.strip() not in ("", "-1")


# Open lock files of the GPUs this process holds; the kernel drops the locks when it exits.
_HELD_GPUS = []


def claim_free_gpu(gpu_ids: list, lock_dir=None):
    """Index into `gpu_ids` (stable identifiers, such as CUDA UUIDs) of the first GPU no other process
    on this host holds, now held by this one until it exits; None when every one is held. Snakemake
    runs local jobs without assigning GPUs, so this is what keeps two training jobs (or two
    data-parallel ranks) off the same GPU."""
    lock_dir = lock_dir or tempfile.gettempdir()
    for index, gpu_id in enumerate(gpu_ids):
        descriptor = os.open(os.path.join(lock_dir, f"ssl_pipeline-gpu-{gpu_id}.lock"),
                             os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        _HELD_GPUS.append(descriptor)
        return index
    return None


def release_gpus() -> None:
    while _HELD_GPUS:
        os.close(_HELD_GPUS.pop())


_CLAIMED_DEVICE = []


def free_cuda_device() -> torch.device:
    """A visible GPU no other process on this host holds; claimed once per process. A rank of
    torchrun takes the GPU of its local rank: the ranks of one job must sit on distinct GPUs."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if ranks_here > torch.cuda.device_count():
            raise GpuUnavailable(f"{ranks_here} data-parallel processes on this node but only "
                                 f"{torch.cuda.device_count()} visible GPU(s); lower config pretrain.processes "
                                 "or ask for more GPUs")
        return torch.device("cuda", int(local_rank))
    if not _CLAIMED_DEVICE:
        ids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        index = claim_free_gpu(ids)
        if index is None:
            log.warning("all %d visible GPUs are held by other training processes on this host; "
                        "sharing cuda:0", len(ids))
        _CLAIMED_DEVICE.append(torch.device("cuda", index or 0))
    return _CLAIMED_DEVICE[0]


def select_device(requested: str, require_gpu: bool) -> torch.device:
    """`auto` takes a free CUDA device when one is usable. torch sees only the GPUs that
    CUDA_VISIBLE_DEVICES names, so a scheduler's GPU assignment is honoured without extra work.
    A GPU counts as asked for when config names one (compute.device cuda*, compute.require_gpu) or
    when CUDA_VISIBLE_DEVICES hands this job one; if none is usable, that is logged as a warning and
    training falls back to the CPU, or it fails when compute.require_gpu is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        if requested == "auto" or requested == "cuda":
            return free_cuda_device()
        return torch.device(requested)
    if not (requested.startswith("cuda") or require_gpu or gpus_named_by(visible)):
        return torch.device("cpu")
    reason = (f"CUDA_VISIBLE_DEVICES={visible!r} but torch finds no usable CUDA device"
              if visible is not None else "torch finds no CUDA device")
    if require_gpu:
        raise GpuUnavailable(f"a GPU is required (config key compute.require_gpu) but {reason}")
    log.warning("a GPU was asked for (compute.device=%s) and %s; falling back to the CPU", requested, reason)
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


def has_cxx_compiler() -> bool:
    """torch.compile on the CPU builds C++ kernels with one of these."""
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def select_compile(requested, device: torch.device) -> bool:
    """compute.compile: true, false or auto. auto compiles on CUDA only: on the CPUs we measured, the
    compiled step was not faster than eager (docs/performance.md, "Compiled steps")."""
    requested = str(requested).lower()
    if requested not in ("auto", "true", "false"):
        raise ValueError(f"config key compute.compile must be auto, true or false, not {requested!r}")
    wanted = device.type == "cuda" if requested == "auto" else requested == "true"
    if wanted and device.type == "cpu" and not has_cxx_compiler():
        raise RuntimeError("config key compute.compile asks for torch.compile on the CPU, which needs a C++ "
                           "compiler (c++, g++ or clang++), and none is on PATH; install one or set "
                           "compute.compile: false")
    return wanted


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(compute: dict, seed: int) -> Runtime:
    """compute: the config's `compute` section (device, require_gpu, precision, threads, compile)."""
    device = select_device(compute["device"], compute["require_gpu"])
    threads = max(1, min(compute["threads"], available_cpus()))
    torch.set_num_threads(threads)
    seed_everything(seed)
    runtime = Runtime(device, select_precision(compute["precision"], device), threads,
                      select_compile(compute.get("compile", "auto"), device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log.info("device %s (%s), autocast %s, %d threads, %s, torch %s, seed %d", device, name,
             str(runtime.autocast_dtype).replace("torch.", ""), threads,
             "torch.compile" if runtime.compile else "eager", torch.__version__, seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return runtime


FAIL_ONCE = "SSL_PIPELINE_FAIL_ONCE"


def fail_once_if_asked(stage: str) -> None:
    """A switch for tests: with SSL_PIPELINE_FAIL_ONCE=<path> in the environment, the first job to get
    here creates <path> and fails; later attempts find it and run. Proves that failed jobs are retried."""
    marker = os.environ.get(FAIL_ONCE)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        log.info("%s=%s exists: the injected failure already happened", FAIL_ONCE, marker)
        return
    raise RuntimeError(f"{stage}: failure injected by the test switch {FAIL_ONCE}={marker}")
