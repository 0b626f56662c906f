"""Fetching dataset files from an ordered list of mirrors.

A mirror is an http(s) URL or a local directory. Data files (IDX) are identified by the sha256 of their
*decompressed* content, because mirrors compress differently (Debian re-gzipped Fashion-MNIST, so its
.gz bytes differ from upstream's); for every mirror we try `<name>.gz`, then `<name>`, and install the
decompressed file. Archives (the other formats) are fetched by their exact name and kept as they are;
their checksum covers the archive file itself. Where a publisher gives only an md5 (CIFAR, STL-10,
MNIST's .gz files), a file's spec may name `md5` instead of `sha256`: it covers the file as fetched.

No mirror can make the download write much more than the file should have: a spec's `size` (an IDX file's
decompressed size, an archive's own), an IDX file's header (its dimensions give its size, so a gzip bomb
stops there), else config download.max_bytes. Fetching itself, resumable and with progress, is
ssl_pipeline/stages/http_fetch.py.
"""
import gzip
import hashlib
import logging
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ssl_pipeline.core.artifacts import atomic_path
from ssl_pipeline.stages.http_fetch import (CHUNK_BYTES, Bound, NotOnMirror, Partial, TooLarge, TransientError,
                                            copy_local, fetch_http, move)

__all__ = ["ChecksumMismatch", "DownloadError", "NotOnMirror", "RetryPolicy", "TooLarge", "TransientError",
           "download_dataset", "download_file", "is_local", "local_directory"]
log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b"
IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # the IDX type codes


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected content; the message lists every attempt."""


class ChecksumMismatch(Exception):
    pass


class ResumedMismatch(Exception):
    """A file continued from a partial file failed its checksum: its first bytes may be of an older file."""


@dataclass(frozen=True)
class RetryPolicy:
    """Config `download`: how often to try, how long to wait, the hard cap on one file, the progress interval."""
    attempts: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 30.0
    max_bytes: int = 200_000_000_000
    progress_seconds: float = 10.0


def is_local(mirror: str) -> bool:
    return "://" not in mirror or mirror.startswith("file://")


def local_directory(mirror: str) -> Path:
    return Path(mirror[len("file://"):] if mirror.startswith("file://") else mirror)


def expected_checksum(checksum) -> tuple:
    """A spec's checksum as (algorithm, hex): a bare string is a sha256."""
    if isinstance(checksum, str):
        return "sha256", checksum
    algorithm = "sha256" if checksum.get("sha256") else "md5"
    return algorithm, checksum[algorithm]


def spec_bound(checksum, policy: RetryPolicy) -> Bound:
    """What the installed file may have: the spec's size where it gives one, else download.max_bytes."""
    hard = Bound(policy.max_bytes, f"download.max_bytes ({policy.max_bytes})")
    size = checksum.get("size") if isinstance(checksum, dict) else None
    return hard if size is None else hard.tighter(Bound(size, f"its size in the config ({size})"))


def gzip_ceiling(size: int) -> int:
    """The most bytes a gzip of `size` bytes can take: deflate's stored blocks add 5 bytes per 64 KiB, the
    gzip header and trailer a few dozen (a file name or comment in the header: allow 64 KiB)."""
    return size + size // 1000 + (1 << 16)


def idx_declared_size(head: bytes, label: str):
    """-> the bytes the IDX header at the start of `head` (plain or gzip'd) declares, whether `head` is gzip'd;
    None while `head` is too short to tell. A file that is not IDX at all fails at once."""
    compressed = head[:2] == GZIP_MAGIC
    data = head
    if compressed:
        try:
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4 + 4 * 255)
        except zlib.error:
            return None  # decompression fails later with the whole story
    if len(data) < 4:
        return None
    if data[0] or data[1] or data[2] not in IDX_ITEM_BYTES or not data[3]:
        raise ChecksumMismatch(
            f"checksum mismatch for {label}: not an IDX file: it starts with 0x{data[:4].hex()}, where an IDX "
            "file has two zero bytes, a type code (0x08 for unsigned bytes) and its number of dimensions")
    header = 4 + 4 * data[3]
    if len(data) < header:
        return None
    size = IDX_ITEM_BYTES[data[2]]
    for dimension in struct.unpack(f">{data[3]}I", data[4:header]):
        size *= dimension
    return header + size, compressed


def decompress_bounded(raw: Path, destination: Path, bound: Bound, label: str) -> str:
    """Write the decompressed content of `raw` to `destination`, never more than the bound; -> its sha256."""
    digest, written = hashlib.sha256(), 0
    try:
        with gzip.open(raw, "rb") as source, open(destination, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                if written + len(chunk) > bound.limit:
                    raise TooLarge(f"{label} decompresses to more than the {bound.limit} bytes of {bound.why}: "
                                   f"stopped there, after writing {written} bytes")
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # the data; a failing disk is no retry case
        raise TransientError(f"{label}: corrupt or truncated gzip data: {error}") from error
    return digest.hexdigest()


def partial_file(partial_dir: Path, mirror: str, candidate: str, checksum) -> Partial:
    """One partial file per file (by its expected checksum) and mirror URL: a partial file never continues
    with the bytes of another mirror, nor of another version of the file."""
    algorithm, expected = expected_checksum(checksum)
    url = mirror.rstrip("/") + "/" + candidate
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Partial(Path(partial_dir) / f"{candidate}.{algorithm}-{expected[:16]}" / f"{key}.partial")


class Candidate:
    """One name to try on one mirror (`<name>.gz` or `<name>` or the archive) with its bounds and checks."""

    def __init__(self, mirror: str, name: str, candidate: str, checksum, policy: RetryPolicy, archive: bool,
                 partial_dir: Path):
        self.mirror, self.name, self.candidate, self.policy, self.archive = mirror, name, candidate, policy, archive
        self.algorithm, self.expected = expected_checksum(checksum)
        self.label = f"{name} from {mirror} ({candidate})"
        self.spec = spec_bound(checksum, policy)
        gzipped = not archive and candidate.endswith(".gz")
        self.fetched = Bound(gzip_ceiling(self.spec.limit), f"a gzip of {self.spec.why}") if gzipped else self.spec
        self.partial = partial_file(partial_dir, mirror, candidate, checksum)

    def head_check(self, head: bytes):
        """IDX files only: the header bounds the file, and its gzip; a file that is no IDX stops at once."""
        declared = idx_declared_size(head, self.label)
        if declared is None:
            return None
        size, compressed = declared
        self.installed = self.installed.tighter(Bound(size, f"the size its IDX header declares ({size})"))
        if compressed:
            return Bound(gzip_ceiling(self.installed.limit), f"a gzip of {self.installed.why}")
        return self.installed

    def fetch(self):
        self.installed = self.spec  # the installed file's bound; the head check may tighten it
        check = None if self.archive else self.head_check
        if is_local(self.mirror):
            return copy_local(local_directory(self.mirror) / self.candidate, self.partial, self.fetched, check,
                              self.algorithm, self.policy.progress_seconds, self.label)
        return fetch_http(self.mirror.rstrip("/") + "/" + self.candidate, self.partial, self.fetched, check,
                          self.algorithm, self.policy.timeout_seconds, self.policy.progress_seconds, self.label)

    def install(self, destination: Path, fresh_retry: bool) -> None:
        """Fetch (continuing a partial file), then install a verified copy at `destination`."""
        fetched = self.fetch()
        with atomic_path(destination) as verified:
            with open(self.partial.path, "rb") as probe:
                compressed = not self.archive and probe.read(2) == GZIP_MAGIC
            if compressed:
                try:
                    installed_sha256 = decompress_bounded(self.partial.path, verified, self.installed, self.label)
                except TransientError:
                    self.partial.discard()  # complete but corrupt: its bytes are no start to continue from
                    raise
                actual = fetched.digest if self.algorithm == "md5" else installed_sha256
            else:  # renamed, not copied: the file is written once
                move(self.partial.path, verified)
                actual = fetched.digest
            self.partial.discard()
            if actual != self.expected:
                if fetched.resumed_from and not fresh_retry:
                    raise ResumedMismatch(fetched.resumed_from)
                again = " (also when fetched again from byte 0)" if fresh_retry else ""
                raise ChecksumMismatch(f"checksum mismatch for {self.label}: expected {self.algorithm} "
                                       f"{self.expected}, got {actual}{again}")


def fetch_verified(mirror: str, name: str, checksum, destination: Path, policy: RetryPolicy,
                   archive: bool = False, partial_dir: Path = None) -> None:
    """Try `<name>.gz` then `<name>` on one mirror (an archive: `<name>` only), with retries, and install
    a verified copy."""
    not_found = []
    for name_on_mirror in ((name,) if archive else (name + ".gz", name)):
        candidate = Candidate(mirror, name, name_on_mirror, checksum, policy, archive, partial_dir)
        attempt, fresh_retry = 1, False
        while True:
            try:
                candidate.install(destination, fresh_retry)
                return
            except ResumedMismatch as resumed:
                # Without validators (ETag, Last-Modified) a changed file shows only here. Once, not in a loop.
                log.warning("checksum mismatch for %s after resuming a partial file at byte %s: the mirror's file "
                            "has changed since those bytes were fetched, or the partial file was damaged; fetching "
                            "it again from byte 0", candidate.label, resumed.args[0])
                fresh_retry = True
            except NotOnMirror as error:
                not_found.append(str(error))
                break
            except (ChecksumMismatch, TooLarge):
                candidate.partial.discard()
                raise
            except TransientError as error:
                if attempt == policy.attempts:
                    raise TransientError(f"{error} (gave up after {attempt} attempts)") from error
                delay = policy.backoff_seconds * 2 ** (attempt - 1)
                log.warning("attempt %d failed: %s; retrying in %.1fs", attempt, error, delay)
                time.sleep(delay)
                attempt += 1
    raise NotOnMirror("; ".join(not_found))


def download_file(name: str, checksum, mirrors: list, destination: Path, policy: RetryPolicy,
                  unreachable: dict, archive: bool = False, partial_dir: Path = None) -> None:
    """Install `name` at `destination` from the first mirror that has it with the right content.

    `unreachable` maps mirrors that failed with a network error to that error, so that the other
    files of a dataset skip them instead of waiting through the same retries again. `partial_dir` keeps
    partial files for a later run to continue; without it they last as long as this call.
    """
    destination = Path(destination)
    temporary = None
    if partial_dir is None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial_dir = temporary = tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.partial-")
    failures = []
    try:
        for mirror in mirrors:
            if mirror in unreachable:
                failures.append(f"{mirror}: skipped, unreachable earlier ({unreachable[mirror]})")
                continue
            log.info("fetching %s from %s", name, mirror)
            try:
                fetch_verified(mirror, name, checksum, destination, policy, archive, partial_dir)
                log.info("installed %s from %s (%s %s)", destination, mirror, *expected_checksum(checksum))
                forget_partial_files(partial_dir, name, checksum)
                return
            except (ChecksumMismatch, TooLarge) as error:
                failures.append(f"{mirror}: {error}")
            except NotOnMirror as error:
                failures.append(f"{mirror}: not found ({error})")
            except TransientError as error:
                failures.append(f"{mirror}: {error}")
                if not is_local(mirror):
                    unreachable[mirror] = str(error)
            log.warning("%s", failures[-1])
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise DownloadError(f"could not fetch {name} from any of {len(mirrors)} mirrors:\n{tried}")


def forget_partial_files(partial_dir: Path, name: str, checksum) -> None:
    """The file is installed: the partial files other mirrors left for it serve no one."""
    algorithm, expected = expected_checksum(checksum)
    for candidate in (name, name + ".gz"):
        shutil.rmtree(Path(partial_dir) / f"{candidate}.{algorithm}-{expected[:16]}", ignore_errors=True)


def download_dataset(files: dict, mirrors: list, destinations: dict, policy: RetryPolicy,
                     archives: bool = False, partial_dir: Path = None) -> None:
    """Fetch every file of a dataset. `files` maps a role to {name, sha256 or md5, size}; `destinations` a
    role to a path. archives: the files are archives, kept as fetched (formats other than idx)."""
    unreachable = {}
    installed = []
    try:
        for role, spec in files.items():
            destination = Path(destinations[role])
            download_file(spec["name"], spec, mirrors, destination, policy, unreachable, archives, partial_dir)
            installed.append(destination)
    except BaseException:
        # The files form one output set: a dataset with a file missing is no dataset.
        for path in installed:
            path.unlink(missing_ok=True)
        raise
