"""Where a training job keeps its images (config `data.residency`), and how batches reach the device.

- device: the whole arrays on the training device, each batch cut there by its index tensor: the
  behaviour from before residencies existed, kept op for op (no host sync inside a step).
- host: the arrays in CPU memory (pinned under CUDA); each batch is gathered on the host by a prefetching
  thread while the previous step runs; on a GPU the same thread starts its copy to the device on a side
  stream (non_blocking, from pinned memory), which the training stream waits for on the device, so the
  copy overlaps the step's kernels instead of queueing behind them.
- disk: the arrays memory-mapped (ssl_pipeline/core/arrays.py); the prefetching thread reads each batch's
  rows in sorted order, one batch ahead (double-buffered: the batch in use and the next one), and drops
  the pages it read from the process, so that its resident memory does not grow with the dataset.
- auto: the first of these that fits the free memory with a margin (DATA_SHARE), and config
  `data.memory_limit`; the log says which and why. On the CPU the device's memory is the host's, so auto
  never picks host there.

The batch order stays where it was: BatchOrder draws each epoch's permutation from the device generator
when the epoch's first batch is asked for, between the same augmentation draws as before. The prefetcher
reads that permutation (one copy to the host per epoch) and never asks BatchOrder for a batch ahead of the
step, so the generator's stream and the position a resume file saves are those of the device residency.
The cost: an epoch's first batch is read without overlap, since its indices do not exist before it.
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.core.arrays import ArrayFileError, open_array

log = logging.getLogger(__name__)
RESIDENCIES = ("device", "host", "disk")
# auto gives the image arrays at most this share of the free memory: training needs the rest (weights,
# optimizer state, activations, the views of a batch).
DATA_SHARE = 0.5
DEFAULT_OPTIONS = {"residency": "auto", "memory_limit": None}


# ---------------------------------------------------------------------------------------------------
# Choosing a residency
# ---------------------------------------------------------------------------------------------------

def cgroup_free_memory():
    """Bytes left under this process's cgroup memory limit (a Slurm job's or a container's), or None:
    cgroup v2's memory.max, else v1's memory.limit_in_bytes."""
    try:
        groups = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    except (OSError, ValueError):
        return None
    candidates = [(Path("/sys/fs/cgroup") / groups.get("", "/").lstrip("/"), "memory.max", "memory.current"),
                  (Path("/sys/fs/cgroup/memory") / groups.get("memory", "/").lstrip("/"), "memory.limit_in_bytes",
                   "memory.usage_in_bytes")]
    for base, limit_file, usage_file in candidates:
        try:
            limit = (base / limit_file).read_text().strip()
            usage = int((base / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
            return int(limit) - usage
    return None


def free_host_memory() -> int:
    """MemAvailable (free memory plus what the kernel can reclaim), within the cgroup's limit."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    in_group = cgroup_free_memory()
    return available if in_group is None else min(available, in_group)


def free_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_host_memory()


def gigabytes(count) -> str:
    return "none" if count is None else f"{count / 1e9:.2f} GB"


def choose_residency(requested: str, nbytes: int, device: torch.device, memory_limit=None):
    """-> (residency, why). requested: config data.residency; nbytes: the job's image bytes."""
    if requested != "auto":
        if requested not in RESIDENCIES:
            raise ValueError(f"config key data.residency must be auto or one of {RESIDENCIES}, got {requested!r}")
        return requested, f"config data.residency is {requested}"
    within_limit = memory_limit is None or nbytes <= memory_limit
    limit = f"data.memory_limit ({gigabytes(memory_limit)})"
    device_free = free_device_memory(device)
    if nbytes <= DATA_SHARE * device_free and (device.type == "cuda" or within_limit):
        return "device", (f"{gigabytes(nbytes)} of images fit in {DATA_SHARE:.0%} of the free memory of {device} "
                          f"({gigabytes(device_free)})" + ("" if device.type == "cuda" else f" and in {limit}"))
    host_free = free_host_memory()
    if device.type == "cuda" and nbytes <= DATA_SHARE * host_free and within_limit:
        return "host", (f"{gigabytes(nbytes)} of images exceed {DATA_SHARE:.0%} of the free memory of {device} "
                        f"({gigabytes(device_free)}) but fit in {DATA_SHARE:.0%} of the free host memory "
                        f"({gigabytes(host_free)}) and in {limit}")
    return "disk", (f"{gigabytes(nbytes)} of images exceed {DATA_SHARE:.0%} of the free memory "
                    f"({gigabytes(device_free)} on {device}, {gigabytes(host_free)} on the host) or {limit}")


# ---------------------------------------------------------------------------------------------------
# A job's images in one residency
# ---------------------------------------------------------------------------------------------------

class ImageData:
    """uint8 images (N, C, H, W): the rows `rows` (None: all) of the arrays in `paths` one after the other,
    kept as `residency` says; batches and chunks come out on `device`."""

    def __init__(self, paths, residency: str, device, rows=None, resume_path=None):
        """resume_path: the job's resume file, removed when these images turn out damaged (discard())."""
        self.residency, self.device = residency, torch.device(device)
        self.resume_path = None if resume_path is None else Path(resume_path)
        self.arrays = [open_array(path) for path in paths]
        self.offsets = np.cumsum([0] + [len(array) for array in self.arrays])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        count = self.offsets[-1] if self.rows is None else len(self.rows)
        self.shape = torch.Size((int(count), *self.arrays[0].shape[1:]))
        self.pinned = self.device.type == "cuda"
        # host and disk on a GPU: each batch's copy runs on a stream of its own (stage()).
        self.copy_stream = torch.cuda.Stream(self.device) if self.pinned and residency != "device" else None
        self.tensor, self.failure = None, None
        if residency in ("device", "host"):
            try:
                self.tensor = self.load(self.device if residency == "device" else torch.device("cpu"),
                                        pinned=residency == "host" and self.pinned)
            except ArrayFileError:
                self.discard()
                raise
        else:  # disk: the checksums are read beside training, not before it
            self.stop_verifying = False
            self.verifier = threading.Thread(target=self.verify, daemon=True, name="verify-shards")
            self.verifier.start()

    def load(self, target: torch.device, pinned: bool = False) -> torch.Tensor:
        """Every selected row in one tensor on `target`, filled piece by piece (at most PIECE_BYTES of one
        shard at a time, ssl_pipeline/core/arrays.py), so that the host never holds a second copy: on a GPU
        it needs one piece beside the device's tensor, and a pinned host tensor is the only copy. Each
        shard's checksum is verified as its bytes are read."""
        if target.type == "cpu" and not pinned and self.rows is None and len(self.arrays) == 1:
            return torch.from_numpy(self.arrays[0].load())
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=target, pin_memory=pinned)
        for number, array in enumerate(self.arrays):
            offset = int(self.offsets[number])
            for start, piece in array.pieces():
                first, last = offset + start, offset + start + len(piece)
                if self.rows is None:
                    out[first:last].copy_(torch.from_numpy(piece))
                    continue
                positions = np.flatnonzero((self.rows >= first) & (self.rows < last))
                if len(positions):
                    values = torch.from_numpy(piece[self.rows[positions] - first])
                    out[torch.from_numpy(positions).to(target)] = values.to(target)
        return out

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def verify(self) -> None:
        try:
            for array in self.arrays:
                array.verify(stop=lambda: self.stop_verifying)
        except Exception as error:  # noqa: BLE001 (re-raised in the training thread by check())
            self.failure = error

    def discard(self) -> None:
        """Damaged images (a checksum, a truncated shard) also remove the job's resume file: its state may
        have been trained on those bytes (the disk residency verifies beside training, so an earlier
        attempt may have written it before the damage was found), and a rerun after the shard is rebuilt
        must start afresh, not continue from it."""
        if self.resume_path is not None and self.resume_path.exists():
            self.resume_path.unlink(missing_ok=True)
            log.error("removed the resume state %s: it may have been trained on the damaged images named below",
                      self.resume_path)

    def check(self) -> None:
        """Raise, in the training thread, what the verifying thread found wrong (before each batch, and
        before a resume state is written)."""
        if self.failure is not None:
            self.discard()
            raise self.failure

    def finish(self) -> None:
        """Before a job writes its outputs: every checksum verified (the disk residency waits for it)."""
        if self.residency == "disk":
            self.verifier.join()
            self.check()

    def close(self) -> None:
        if self.residency == "disk":
            self.stop_verifying = True

    # ---- reading rows on the host -------------------------------------------------------------------
    def gather(self, positions: np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) on the host (pinned under CUDA): the images at `positions` of this data."""
        out = torch.empty((len(positions), *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pinned)
        if self.tensor is not None:  # host
            torch.index_select(self.tensor, 0, torch.from_numpy(positions), out=out)
            return out
        rows = positions if self.rows is None else self.rows[positions]
        target = out.numpy()
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for number, array in enumerate(self.arrays):
            mine = which == number
            if mine.any():
                target[mine] = array.take(rows[mine] - self.offsets[number], release=True)
        return out

    def stage(self, positions: np.ndarray):
        """gather(positions), in the prefetching thread; on a GPU also its copy to the device, started on
        a side stream from the pinned batch, so that it overlaps the step the training stream runs.
        -> what ready() takes."""
        batch = self.gather(positions)
        if self.copy_stream is None:
            return batch, None
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            moved = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return moved, copied

    def ready(self, staged) -> torch.Tensor:
        """A staged batch on the device, for the current stream: it waits (on the device, not the host) for
        the copy, and the allocator keeps the batch's memory until that stream is done with it."""
        batch, copied = staged
        if copied is None:
            return batch.to(self.device)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(copied)
        batch.record_stream(stream)
        return batch

    # ---- what training and inference read ----------------------------------------------------------
    def batches(self, order) -> "Batches":
        return Batches(self, order)

    def chunks(self, size: int):
        """Consecutive slices (at most `size` images each) on the device; from the host or the disk the
        next slice is read while the current one is used."""
        starts = range(0, len(self), size)
        if self.residency == "device":
            yield from (self.tensor[start:start + size] for start in starts)
            return
        read = lambda start: self.stage(np.arange(start, min(start + size, len(self)), dtype=np.int64))  # noqa: E731
        with ThreadPoolExecutor(1, thread_name_prefix="read-chunks") as pool:
            pending = pool.submit(read, 0) if len(self) else None
            for start in starts:
                chunk = pending.result()
                pending = pool.submit(read, start + size) if start + size < len(self) else None
                self.check()
                yield self.ready(chunk)


class Batches:
    """The step's batch, in BatchOrder's order: next() -> (index (B,) on the device, uint8 images
    (B, C, H, W) on the device). The index is BatchOrder's own tensor, for the labels on the device."""

    def __init__(self, data: ImageData, order):
        self.data, self.order = data, order
        self.epoch_order, self.host_order, self.pending = None, None, None
        self.pool = None if data.residency == "device" else ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def next(self):
        index = self.order.next_batch()  # (B,) on the device, drawn exactly as for the device residency
        if self.pool is None:
            return index, self.data.tensor[index]
        self.data.check()
        if self.order.order is not self.epoch_order:  # a new epoch, or a restored position
            self.epoch_order, self.pending = self.order.order, None
            self.host_order = self.order.order.cpu().numpy()  # one small copy per epoch
        position = self.order.taken - 1
        if self.pending is not None and self.pending[0] == position:
            batch = self.pending[1].result()
        else:
            batch = self.data.stage(self.positions(position))
        self.pending = None
        if position + 1 < self.order.steps_per_epoch:
            self.pending = (position + 1, self.pool.submit(self.data.stage, self.positions(position + 1)))
        return index, self.data.ready(batch)

    def positions(self, position: int) -> np.ndarray:
        size = self.order.batch_size
        return self.host_order[position * size:(position + 1) * size]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def job_images(image_sets: dict, device, options=None, resume_path=None) -> dict:
    """One residency for all of a job's images, chosen on their total size and logged: image_sets:
    name -> (paths, rows or None) -> name -> ImageData. options: config `data` (residency, memory_limit);
    None: auto without a limit. resume_path: a training job's resume file, removed if the images are
    damaged (ImageData.discard)."""
    options = {**DEFAULT_OPTIONS, **(options or {})}
    device = torch.device(device)
    sizes = {}
    for name, (paths, rows) in image_sets.items():
        arrays = [open_array(path) for path in paths]
        count = sum(len(array) for array in arrays) if rows is None else len(rows)
        sizes[name] = count * arrays[0].row_bytes
    residency, why = choose_residency(options["residency"], sum(sizes.values()), device, options["memory_limit"])
    log.info("data: %s of images (%s) kept on %s: %s", gigabytes(sum(sizes.values())),
             ", ".join(f"{name} {gigabytes(size)}" for name, size in sizes.items()),
             {"device": f"the device ({device})", "host": "the host", "disk": "disk (memory-mapped)"}[residency], why)
    return {name: ImageData(paths, residency, device, rows, resume_path) for name, (paths, rows) in image_sets.items()}
