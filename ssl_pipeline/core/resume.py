"""Resumable training: a killed, preempted or timed-out job continues where it stopped, bit for bit.

A training job writes its whole state (weights, optimizer, scheduler, counters, curve and every RNG)
to a resume file every `compute.checkpoint_every` minutes of wall time, at a step boundary. The file
is not a declared output: Snakemake deletes a failed job's outputs, and this file must survive the
failure. A rerun of the same job, with the same settings and inputs, finds it and continues from it;
the job deletes it once its outputs are written.

Wall time rather than epochs sets the interval because that is what bounds the work a kill loses,
whatever the dataset size, epoch length or device; fine-tuning has no epochs at all.

Besides the interval, a job writes its state and stops (exit status 75, EX_TEMPFAIL) when:
- it receives SIGTERM (scancel, preemption, a node draining): at the next step boundary;
- its Slurm job is `compute.stop_margin_seconds` from its time limit. Slurm's own end time of the
  job is the deadline; the slurm executor plugin forwards no signal, so training watches the clock.
Snakemake's retries then start the job again, and it resumes.
"""
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ssl_pipeline.core.artifacts import atomic_path
from ssl_pipeline.core.training import restore_optimisation

log = logging.getLogger(__name__)

FORMAT = 1
STOPPED_EXIT_STATUS = 75  # EX_TEMPFAIL: try again later
# In every message of a stop with the state written; the multi-node launcher looks for it in the ranks' logs.
STOPPED_MARK = "; its state is in "


class TrainingStopped(Exception):
    """Training wrote its resume state and stopped early (SIGTERM or the job's deadline). Its message
    is all the job's log needs: the command line prints it last, without a traceback."""
    exit_status = STOPPED_EXIT_STATUS


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step and the resume file kept."""
    exit_status = 1


def resume_options(resume, output_path) -> dict:
    """resume: {path, checkpoint_every, stop_margin_seconds, mode} as the command line passes them;
    None (a direct call from Python) keeps the resume file beside the output, with config defaults."""
    if resume is not None:
        return resume
    return {"path": f"{output_path}.resume", "checkpoint_every": 5.0, "stop_margin_seconds": 120,
            "mode": "same_settings"}


# ---------------------------------------------------------------------------------------------------
# Which job a resume file belongs to
# ---------------------------------------------------------------------------------------------------

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_identity(stage: str, settings: dict, inputs: dict, world_size: int = 1) -> dict:
    """What a resume file must match to be continued: the stage, every setting the job reads (threads
    included: they change the order of floating-point sums on the CPU), the content of its inputs and
    the number of data-parallel processes. inputs: name -> path (None for an absent one)."""
    return {"stage": stage, "settings": settings, "world_size": world_size,
            "inputs": {name: file_sha256(path) if path else None for name, path in sorted(inputs.items())}}


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def flatten(tree: dict, prefix="") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(found: dict, expected: dict) -> list:
    """Dotted keys whose values differ between two identities, e.g. settings.pretrain.learning_rate."""
    found, expected = flatten(found), flatten(expected)
    return sorted(key for key in found.keys() | expected.keys() if found.get(key) != expected.get(key))


# ---------------------------------------------------------------------------------------------------
# The resume file
# ---------------------------------------------------------------------------------------------------

class ResumeFile:
    """The resume file of one job. mode: config `compute.resume`: same_settings continues only from a
    file of this very job; any_settings also from one written with other settings (the job's stage
    and inputs must still match), e.g. after lowering the learning rate; off never continues."""

    def __init__(self, path, identity: dict, mode: str = "same_settings"):
        self.path = Path(path)
        self.identity = identity
        self.mode = mode

    def load(self):
        """The saved state, or None (with a warning naming the file) when there is none to continue."""
        if self.mode == "off" or not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            found = saved["identity"]
            if saved.get("format") != FORMAT or not isinstance(found, dict) or "state" not in saved:
                raise ValueError("not a resume file of this version")
        except Exception as error:  # truncated, corrupt or foreign: any of torch.load's errors
            log.warning("ignoring resume file %s: it cannot be read (%s: %s); starting afresh",
                        self.path, type(error).__name__, error)
            return None
        if found.get("stage") != self.identity["stage"]:
            log.warning("ignoring resume file %s: it was written by rule %s, not %s; starting afresh",
                        self.path, found.get("stage"), self.identity["stage"])
            return None
        changed = differences(found, self.identity)
        settings_only = all(key.startswith("settings.") for key in changed)
        if changed and not (self.mode == "any_settings" and settings_only):
            log.warning("ignoring resume file %s: it was written with other settings or inputs (%s); "
                        "starting afresh", self.path, ", ".join(changed))
            return None
        if changed:
            log.warning("resume file %s was written with other settings (%s); continuing from it "
                        "with the new ones (config compute.resume: any_settings)", self.path, ", ".join(changed))
        return saved["state"]

    def save(self, state: dict) -> None:
        """Write atomically: a crash mid-write leaves the previous file as it was."""
        with atomic_path(self.path) as temporary:
            with open(temporary, "wb") as handle:
                torch.save({"format": FORMAT, "identity": self.identity, "state": state}, handle)
                handle.flush()
                os.fsync(handle.fileno())

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# What a resume file holds
# ---------------------------------------------------------------------------------------------------

def shared_state(modules: dict, optimizer, scheduler, **progress) -> dict:
    """The state every rank has alike: weights, optimizer and schedule, and progress (curve, ...)."""
    return {"modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **progress}


def own_state(generator, order, **progress) -> dict:
    """The state of one rank: its RNGs, its place in its batch order, its running sums."""
    return {"rng": rng_states(generator), "order": order.state_dict(), **progress}


def restore_training(saved: dict, rank: int, modules: dict, optimizer, scheduler, generator, order):
    """Load a resume file's state into a freshly built run -> (steps done, curve, this rank's state)."""
    for name, module in modules.items():
        module.load_state_dict(saved["modules"][name])
    restore_optimisation(optimizer, scheduler, saved["optimizer"], saved["scheduler"])
    own = saved["per_rank"][rank]
    order.load_state_dict(own["order"])
    restore_rng_states(own["rng"], generator)
    return saved["step"], saved["curve"], own


# ---------------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------------

def rng_states(generator: torch.Generator) -> dict:
    """Every RNG training may draw from, in a form torch.load(weights_only=True) accepts."""
    numpy_state = np.random.get_state()
    return {
        "device_generator": generator.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["device_generator"])
    torch.set_rng_state(states["torch_cpu"])
    if states["torch_cuda"]:
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------
# When to write the state, and when to stop
# ---------------------------------------------------------------------------------------------------

def slurm_deadline():
    """time.time() at which Slurm ends this job (None outside a Slurm job, or when Slurm gives no
    limit): SLURM_JOB_END_TIME where Slurm sets it (23.02 and later), else squeue's end time."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    try:
        end = subprocess.run(["squeue", "--noheader", "--jobs", os.environ["SLURM_JOB_ID"], "--format=%e"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return datetime.fromisoformat(end).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        log.warning("cannot read the time limit of Slurm job %s (%s); training will not stop "
                    "before it", os.environ["SLURM_JOB_ID"], error)
        return None


_SIGTERM = {"received": False}


def note_sigterm(signum, frame) -> None:
    _SIGTERM["received"] = True


# What to do after a step, in rising urgency; under data parallelism the ranks take the maximum.
CARRY_ON, WRITE_STATE, DEADLINE_NEAR, SIGTERM_ARRIVED = range(4)


class Checkpointer:
    """Decides at every step boundary whether to write the resume state and whether to stop, and
    stops a run whose loss became NaN or infinite. options: config `compute` keys checkpoint_every
    (minutes; 0: after every step) and stop_margin_seconds. describe_step(step) names a step for
    messages, e.g. 'epoch 2, step 7 of 210'. Under data parallelism the ranks agree on every
    decision, so they write and stop at the same step."""

    def __init__(self, stage: str, resume_file: ResumeFile, options: dict, ranks, device, describe_step,
                 check_every: int):
        """check_every: steps between checks of the loss where training syncs anyway (an epoch, an
        evaluation); a write of the state checks it too."""
        self.stage, self.resume_file, self.ranks, self.device = stage, resume_file, ranks, device
        self.describe_step, self.check_every = describe_step, check_every
        self.interval = 60.0 * options["checkpoint_every"]
        self.margin = options["stop_margin_seconds"]
        self.last_write = time.monotonic()
        self.divergence = DivergenceWatch(device)
        deadline = slurm_deadline()
        self.stop_at = None if deadline is None else deadline - self.margin
        if deadline is not None:
            log.info("Slurm ends this job at %s: training stops %d s before",
                     datetime.fromtimestamp(deadline).isoformat(timespec="seconds"), self.margin)
        _SIGTERM["received"] = False
        self.previous_handler = signal.signal(signal.SIGTERM, note_sigterm)

    def reason(self) -> int:
        """What to do after this step, the most urgent reason first."""
        if _SIGTERM["received"]:
            return SIGTERM_ARRIVED
        if self.stop_at is not None and time.time() >= self.stop_at:
            return DEADLINE_NEAR
        return WRITE_STATE if time.monotonic() - self.last_write >= self.interval else CARRY_ON

    def agreed_reason(self) -> int:
        reason = self.reason()
        if self.ranks.world_size > 1:  # the most urgent reason of any rank
            flag = torch.tensor([reason], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = int(flag.item())
        return reason

    def after_step(self, step: int, loss: torch.Tensor, snapshot) -> None:
        """step counts from 1 over the whole run; snapshot() -> (state shared by all ranks, this rank's
        own state), called only when the state is written."""
        self.divergence.watch(loss, step)
        reason = self.agreed_reason()
        if reason == CARRY_ON:
            if step % self.check_every == 0:
                self.check_finite()
            return
        self.check_finite()  # never save a state from after the blow-up
        self.write(snapshot, step)
        if reason in (DEADLINE_NEAR, SIGTERM_ARRIVED):
            self.release()
        if reason == DEADLINE_NEAR:
            raise TrainingStopped(f"{self.stage} stopped at {self.describe_step(step)}, {self.margin} s before "
                                  f"its Slurm job's time limit{STOPPED_MARK}{self.resume_file.path}, and "
                                  "the next attempt continues from it")
        if reason == SIGTERM_ARRIVED:
            raise TrainingStopped(f"{self.stage} stopped by SIGTERM at {self.describe_step(step)}{STOPPED_MARK}"
                                  f"{self.resume_file.path}: run the same command again to continue")

    def write(self, snapshot, step: int) -> None:
        started = time.perf_counter()
        shared, own = snapshot()
        if self.ranks.world_size > 1:
            per_rank = [None] * self.ranks.world_size
            dist.all_gather_object(per_rank, own)
        else:
            per_rank = [own]
        if self.ranks.is_main:
            self.resume_file.save({**shared, "step": step, "per_rank": per_rank})
        if self.ranks.world_size > 1:
            # No rank goes on (or exits, after a stop) before rank 0 has the state on disk: a launcher
            # that ends the whole world when one rank exits (srun --kill-on-bad-exit, torchrun) must not
            # kill rank 0 mid-write.
            dist.barrier()
        self.last_write = time.monotonic()
        log.info("resume state at %s written in %.3f s", self.describe_step(step), time.perf_counter() - started)

    def check_finite(self) -> None:
        bad = self.divergence.first_bad()
        if bad is None:
            return
        if self.resume_file.path.exists():
            kept = (f"the last resume state ({self.resume_file.path}) is kept: lower the learning rate "
                    "and set config compute.resume: any_settings to continue from it")
        else:
            kept = "no resume state was written before it"
        self.release()
        raise TrainingDiverged(f"{self.stage}: the loss became NaN or infinite at {self.describe_step(bad)}; "
                               f"{kept}")

    def finish(self) -> None:
        """Call before writing the outputs; delete the resume file after them."""
        self.check_finite()
        self.release()

    def release(self) -> None:
        """Give SIGTERM back to the handler it had before training."""
        signal.signal(signal.SIGTERM, self.previous_handler)


class DivergenceWatch:
    """Remembers, on the device, the first step whose loss was NaN or infinite: checking it needs a
    host sync, so it is read only where training syncs anyway (saving state, epoch ends, the end)."""

    def __init__(self, device):
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet

    def watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step == 0), step, self.first_bad_step)

    def first_bad(self):
        step = int(self.first_bad_step.item())
        return step or None
