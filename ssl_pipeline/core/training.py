"""Pieces shared by the pretraining and fine-tuning loops."""
import csv
import math
import time

import torch

from ssl_pipeline.core.artifacts import atomic_path


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero at `total_steps`."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(parameters, settings: dict):
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=settings["learning_rate"],
                             weight_decay=settings["weight_decay"])


def optimisation_step(loss, optimizer, scheduler) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def restore_optimisation(optimizer, scheduler, optimizer_state: dict, scheduler_state: dict) -> None:
    """Load saved optimizer and scheduler state (moments, step counts, schedule position) but keep
    the hyperparameters of this run, so a resumed run may lower the learning rate. With unchanged
    settings this gives exactly the saved learning rate: LambdaLR computes it the same way."""
    fresh_groups = [{key: value for key, value in group.items() if key != "params"}
                    for group in optimizer.param_groups]
    fresh_base_lrs = list(scheduler.base_lrs)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    scheduler.base_lrs = fresh_base_lrs
    for group, fresh, base_lr, factor in zip(optimizer.param_groups, fresh_groups, fresh_base_lrs,
                                             scheduler.lr_lambdas):
        group.update(fresh)
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def save_checkpoint(path, payload: dict) -> None:
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_curve(path, rows: list) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class Stopwatch:
    """Wall time that waits for queued GPU work, so throughput figures are true. Call it at epoch or
    evaluation boundaries only: synchronising every step would stall the GPU. A resumed run starts it
    at the seconds its earlier attempts trained."""

    def __init__(self, device, already: float = 0.0):
        self.device = device
        self.start = time.perf_counter() - already

    def seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start


def pretraining_identity(checkpoint: dict) -> dict:
    """objective, sweep variant and pretraining seed of a pretraining checkpoint: the identity of the run
    (one path scheme, workflow/rules/common.smk)."""
    pretrain = checkpoint["config"]["pretrain"]
    return {"objective": pretrain["objective"], "variant": pretrain.get("variant", "base"),
            "pretrain_seed": pretrain["seed"]}
