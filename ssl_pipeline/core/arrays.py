"""Logical arrays: one uint8 `.npy` file, or a sharded array that preprocessing wrote as several `.npy`
files and a small index file, read as one array along axis 0 without a merge copy.

The index file `<name>.index.json` (written by ssl_pipeline/stages/preprocess.py):

    {"format": "ssl_pipeline.sharded_array", "version": 1, "dtype": "uint8", "shape": [N, C, H, W],
     "shards": [{"file": "shards/train_images/00000.npy", "count": 4096, "sha256": "<hex>"}, ...]}

`file` is relative to the index file's directory; the shards are consecutive slices along axis 0, and a
shard's sha256 is that of its whole `.npy` file, header included (what `sha256sum` prints).

Opening checks the structure of every shard, which costs one header read each: a truncated file, a shape
or dtype that disagrees with the index, counts that do not sum to the shape. The checksums cost a read of
every byte (190 GB for ImageNet at 224 px), so they are checked where the bytes are read anyway: while
`load` reads a whole array into memory (the device and host residencies), and by `verify` otherwise (the
disk residency runs it in a background thread during the first epoch, ssl_pipeline/core/residency.py).
Rows are read through read-only memory maps; `take(..., release=True)` drops the pages it read from the
process's page tables afterwards (the page cache keeps them), so that a job's resident memory does not
grow with the dataset.
"""
import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_FORMAT = "ssl_pipeline.sharded_array"
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
HASH_BLOCK = 1 << 20
PAGE = mmap.PAGESIZE
# What `pieces` reads at a time: a job that fills a device or pinned tensor holds no more beside it.
PIECE_BYTES = 1 << 28


class ArrayFileError(ValueError):
    """A data array or one of its shards is unreadable or disagrees with its index; the message names the
    file (and the shard)."""


def split_images_path(data_dir, split: str) -> Path:
    """The images of one split: the sharded array's index file where preprocessing wrote shards, else the
    single `.npy` (labels are always one `.npy`). The dataset card says which preprocessing wrote the
    directory last (a sharded one has the key "shards"), and its file wins where both exist, so that the
    files an earlier run in the other mode left in the same results/data are never read."""
    data_dir = Path(data_dir)
    index, single = data_dir / f"{split}_images{INDEX_SUFFIX}", data_dir / f"{split}_images.npy"
    card = data_dir / "card.json"
    sharded = "shards" in json.loads(card.read_text()) if card.exists() else index.exists()
    preferred, other = (index, single) if sharded else (single, index)
    return preferred if preferred.exists() or not other.exists() else other


def allow_open_files(count: int, where) -> None:
    """Each memory-mapped shard holds a file handle for the whole job: raise the soft limit on open files
    towards the hard one where `count` more would not fit, and fail naming the array where even that is
    too few (instead of a bare "Too many open files" later)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + len(os.listdir("/proc/self/fd")) + 64 if os.path.isdir("/proc/self/fd") else count + 256
    if needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ArrayFileError(f"{where}: {count} shards need as many open files, beyond this process's hard "
                             f"limit of {hard} (ulimit -Hn); choose a larger preprocess.shard_images")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Shard:
    """One `.npy` file holding rows [start, start + count) of the logical array."""
    path: Path
    start: int
    count: int
    sha256: str  # None for a plain .npy, which has no checksum of its own
    header_bytes: int
    rows: np.ndarray = None  # (count, ...) view of the read-only memory map
    mapping: mmap.mmap = None

    def open(self, shape, dtype) -> None:
        if self.count == 0:
            self.rows = np.empty((0, *shape[1:]), dtype)
            return
        with open(self.path, "rb") as handle:
            self.mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.rows = np.frombuffer(self.mapping, dtype, self.count * int(np.prod(shape[1:])),
                                  self.header_bytes).reshape(self.count, *shape[1:])

    def release(self, first: int, last: int) -> None:
        """Unmap the pages of rows first..last (inclusive) from this process; they stay in the page cache."""
        if self.mapping is None:
            return
        row_bytes = self.rows[0].nbytes
        begin = (self.header_bytes + first * row_bytes) // PAGE * PAGE
        end = min(len(self.mapping), self.header_bytes + (last + 1) * row_bytes)
        self.mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def read_npy_header(path: Path, where: str):
    """-> (shape, dtype, header bytes) of a .npy file, after checking that its size matches its header."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran_order, dtype = reader[version](handle)
            header_bytes = handle.tell()
    except FileNotFoundError:
        raise ArrayFileError(f"{where}: {path} does not exist") from None
    except (ValueError, KeyError, OSError, EOFError) as error:
        raise ArrayFileError(f"{where}: {path} is not a readable .npy file (its header is truncated or "
                             f"corrupt: {error})") from None
    if fortran_order:
        raise ArrayFileError(f"{where}: {path} is in Fortran order; the data arrays are C-ordered")
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise ArrayFileError(f"{where}: {path} is truncated or overlong: {actual} bytes, but its header "
                             f"({dtype}, shape {tuple(shape)}) needs {expected}")
    return tuple(shape), dtype, header_bytes


class LogicalArray:
    """Rows of one or more `.npy` shards as one array (N, ...) along axis 0."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, shards: list):
        self.path, self.shape, self.dtype, self.shards = Path(path), tuple(shape), np.dtype(dtype), shards
        self.starts = np.array([shard.start for shard in shards], dtype=np.int64)
        for shard in shards:
            shard.open(self.shape, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def describe(self) -> str:
        kind = f"{len(self.shards)} shards" if self.sharded else "one file"
        return f"{self.path} ({kind}, {self.dtype}, shape {self.shape})"

    @property
    def sharded(self) -> bool:
        return self.path.name.endswith(INDEX_SUFFIX)

    def load(self) -> np.ndarray:
        """The whole array in memory, each shard's checksum verified as its bytes are read."""
        if not self.sharded:
            return np.load(self.path)
        out = np.empty(self.shape, self.dtype)
        for start, piece in self.pieces():
            out[start:start + len(piece)] = piece
        return out

    def pieces(self, piece_bytes: int = PIECE_BYTES):
        """-> (first row, rows) of the whole array in order, at most `piece_bytes` of one shard at a time,
        each shard's checksum checked once its last piece is read (before the next shard's first)."""
        rows_per_piece = max(1, piece_bytes // max(1, self.row_bytes))
        for shard in self.shards:
            digest = hashlib.sha256() if shard.sha256 is not None else None
            with open(shard.path, "rb") as handle:
                header = handle.read(shard.header_bytes)
                if digest is not None:
                    digest.update(header)
                for first in range(0, shard.count, rows_per_piece):
                    piece = np.empty((min(rows_per_piece, shard.count - first), *self.shape[1:]), self.dtype)
                    view = memoryview(piece.reshape(-1).view(np.uint8))
                    if handle.readinto(view) != len(view):
                        raise ArrayFileError(f"{self.path}: shard {shard.path} ended early while being read")
                    if digest is not None:
                        digest.update(view)
                    yield shard.start + first, piece
                if digest is not None:
                    digest.update(handle.read())
                    self.check_digest(shard, digest.hexdigest())

    def verify(self, stop=None) -> None:
        """Check every shard's checksum (a read of every byte); stop(): True to give up early."""
        for shard in self.shards:
            if stop is not None and stop():
                return
            if shard.sha256 is not None:
                self.check_digest(shard, file_sha256(shard.path))

    def check_digest(self, shard: Shard, found: str) -> None:
        if shard.sha256 is not None and found != shard.sha256:
            raise ArrayFileError(f"{self.path}: shard {shard.path} has sha256 {found}, but the index says "
                                 f"{shard.sha256}: the shard is corrupt or was rewritten; run preprocessing again")

    def rows(self, start: int, stop: int, release: bool = False) -> np.ndarray:
        """A copy of rows [start, stop)."""
        return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64), release)

    def take(self, indices: np.ndarray, release: bool = False) -> np.ndarray:
        """A copy of the rows at `indices` (any order, repeats allowed), read shard by shard in sorted
        order so that the reads move forward through each file."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        permutation = np.argsort(indices, kind="stable")
        ordered = indices[permutation]
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        shard_of = np.searchsorted(self.starts, ordered, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for number, shard in enumerate(self.shards):
            low, high = bounds[number], bounds[number + 1]
            if low == high:
                continue
            local = ordered[low:high] - shard.start
            out[permutation[low:high]] = shard.rows[local]
            if release:
                shard.release(int(local[0]), int(local[-1]))
        return out


def open_array(path) -> LogicalArray:
    """A `.npy` file or a sharded array's index file (`<name>.index.json`) as one LogicalArray; raises
    ArrayFileError naming the file and shard when the structure is wrong (see the module docstring)."""
    path = Path(path)
    if not path.name.endswith(INDEX_SUFFIX):
        shape, dtype, header_bytes = read_npy_header(path, str(path))
        return LogicalArray(path, shape, dtype, [Shard(path, 0, shape[0] if shape else 0, None, header_bytes)])
    try:
        index = json.loads(path.read_text())
        if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
            raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}, expected "
                             f"{INDEX_FORMAT!r} version {INDEX_VERSION}")
        shape, dtype = tuple(int(n) for n in index["shape"]), np.dtype(index["dtype"])
        specs = [(spec["file"], int(spec["count"]), spec.get("sha256")) for spec in index["shards"]]
    except FileNotFoundError:
        raise ArrayFileError(f"{path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArrayFileError(f"{path} is not a sharded-array index file: {error}") from None
    if sum(count for _, count, _ in specs) != shape[0]:
        raise ArrayFileError(f"{path}: the shards' counts sum to {sum(count for _, count, _ in specs)}, but the "
                             f"index's shape {shape} has {shape[0]} rows")
    allow_open_files(len(specs), path)
    shards, start = [], 0
    for file, count, sha256 in specs:
        shard_path = path.parent / file
        where = f"{path}, shard {file}"
        found_shape, found_dtype, header_bytes = read_npy_header(shard_path, where)
        if found_dtype != dtype or found_shape != (count, *shape[1:]):
            raise ArrayFileError(f"{where}: the shard holds {found_dtype} of shape {found_shape}, but the index "
                                 f"says {dtype} of shape {(count, *shape[1:])}")
        shards.append(Shard(shard_path, start, count, sha256, header_bytes))
        start += count
    return LogicalArray(path, shape, dtype, shards)
