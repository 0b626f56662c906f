"""Data-parallel pretraining with DistributedDataParallel, on one node or several.

`python -m ssl_pipeline pretrain` hands itself to torchrun when it is to run as several processes
(config key pretrain.processes, by default one per GPU the job's resources ask for), or on several
Slurm nodes to srun, one task per process (config compute.nodes; ssl_pipeline/core/multinode.py). Each process
(rank) joins the process group, trains on its own shard of the images, which live on its device,
and averages gradients with the others; rank 0 alone writes the outputs. The contrastive loss sees
the projections of every rank (objectives.gather_from_all_ranks). On the CPU, gloo stands in for
NCCL: that is how the tests run two ranks without a GPU.
"""
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ssl_pipeline.core.multinode import node_name, rendezvous_store, seconds_since_launch

log = logging.getLogger(__name__)


def processes_for(setting, gpus: int) -> int:
    """config pretrain.processes ('auto' or a count) and the GPUs of the job -> processes to run."""
    return max(1, gpus) if setting == "auto" else int(setting)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def torchrun_command(processes: int, argv: list) -> list:
    """`python -m ssl_pipeline <argv>` as `processes` ranks on this node. `python -m
    torch.distributed.run` is torchrun, found through this interpreter rather than PATH; --standalone
    picks a free port, so several such jobs can share a node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "ssl_pipeline", *argv]


def relaunch_under_torchrun(processes: int, argv: list) -> None:
    """Replace this process by torchrun running `processes` copies of it. Returns (doing nothing) when
    one process is asked for, or when this process already is one of torchrun's."""
    if processes <= 1 or under_torchrun():
        return
    command = torchrun_command(processes, argv)
    log.info("starting %d data-parallel processes: %s", processes, " ".join(command))
    # torchrun's own default, set to keep its banner out of the log; each rank sets its threads itself.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def per_node(self) -> int:
        """Ranks on this node, which share its CPUs (and take one GPU each)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))


def launched_ranks() -> Ranks:
    """This process's place among torchrun's (read from the environment torchrun sets)."""
    if not under_torchrun():
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


def rank_logging(ranks: Ranks, rank_logs=None) -> None:
    """rank_logs: a directory for one log per rank, rank<R>-<node>.log, with everything the rank logs.
    Rank 0 alone also writes its info to the job's log; the other ranks only their warnings."""
    if ranks.world_size == 1 or rank_logs is None:
        return  # without rank logs, the others go quiet once they have joined (join)
    path = Path(rank_logs) / f"rank{ranks.rank}-{node_name()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    if not ranks.is_main:
        for other in root.handlers:
            other.setLevel(logging.WARNING)
    root.addHandler(handler)


def join(ranks: Ranks, device: torch.device, timeout_seconds: int = 600) -> None:
    """Join the process group of the ranks: NCCL between GPUs, gloo between CPU processes. A
    collective that waits longer than timeout_seconds for a rank fails this one, naming the wait, so
    a job whose rank died ends instead of hanging."""
    if ranks.world_size == 1:
        return
    timeout = timedelta(seconds=timeout_seconds)
    store = rendezvous_store(ranks.rank, ranks.world_size, timeout_seconds)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is None:  # torchrun's rendezvous (env://)
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
    since = seconds_since_launch()
    log.info("rank %d of %d joined the process group (%s) on %s, node %s (pid %d)%s", ranks.rank, ranks.world_size,
             dist.get_backend(), device, node_name(), os.getpid(),
             "" if since is None else f", {since:.1f} s after srun started (start-up and rendezvous)")
    if not ranks.is_main and not any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        # Every rank logs the same loss; rank 0 speaks for them, the others only warn.
        logging.getLogger("ssl_pipeline").setLevel(logging.WARNING)


def world(ranks: Ranks) -> dict:
    """The node of every rank (in rank order) and the world size, for the checkpoint's card."""
    nodes = [node_name()]
    if ranks.world_size > 1:
        nodes = [None] * ranks.world_size
        dist.all_gather_object(nodes, node_name())
    return {"world_size": ranks.world_size, "nodes": sorted(set(nodes), key=nodes.index), "rank_nodes": nodes}


def leave(ranks: Ranks) -> None:
    if ranks.world_size == 1:
        return
    dist.barrier()
    dist.destroy_process_group()


def shard(images: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's images: every world_size-th one from its rank on (so each shard mixes all classes
    even when the file is sorted), cut to the same count on every rank, since DDP needs every rank in
    every step. (N, ...) -> (N // world_size, ...)."""
    per_rank = len(images) // ranks.world_size
    return images[ranks.rank::ranks.world_size][:per_rank].contiguous()


def data_parallel(module: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """`module` with its gradients averaged over the ranks after every backward pass."""
    if ranks.world_size == 1 or not any(p.requires_grad for p in module.parameters()):
        return module  # nothing to average (e.g. SimCLR without a projection head)
    if device.type == "cuda":
        # BatchNorm over the global batch, as SimCLR does across devices (in place: the layers keep
        # their state_dict keys, so the checkpoint loads into a plain encoder). gloo has no SyncBatchNorm.
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
