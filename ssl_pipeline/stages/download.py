"""Fetching dataset files from an ordered list of mirrors.

A mirror is an http(s) URL or a local directory. Data files (IDX) are identified by the sha256 of their
*decompressed* content, because mirrors compress differently (Debian re-gzipped Fashion-MNIST, so its
.gz bytes differ from upstream's); for every mirror we try `<name>.gz`, then `<name>`, and install the
decompressed file. Archives (the other formats) are fetched by their exact name and kept as they are;
their checksum covers the archive file itself. Where a publisher gives only an md5 (CIFAR, STL-10,
MNIST's .gz files), a file's spec may name `md5` instead of `sha256`: it covers the file as fetched.
"""
import gzip
import hashlib
import http.client
import logging
import shutil
import socket
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from ssl_pipeline.core.artifacts import atomic_path, file_digest

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected content; the message lists every attempt."""


class ChecksumMismatch(Exception):
    pass


class NotOnMirror(Exception):
    pass


class TransientError(Exception):
    """Worth retrying: timeouts, refused or reset connections, 5xx answers, truncated transfers."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 30.0


def is_local(mirror: str) -> bool:
    return "://" not in mirror or mirror.startswith("file://")


def local_directory(mirror: str) -> Path:
    return Path(mirror[len("file://"):] if mirror.startswith("file://") else mirror)


def fetch_to(mirror: str, filename: str, destination: Path, timeout: float) -> None:
    """Copy one file from a mirror to `destination`, raising NotOnMirror or TransientError."""
    if is_local(mirror):
        source = local_directory(mirror) / filename
        if not source.is_file():
            raise NotOnMirror(f"{source} does not exist")
        shutil.copyfile(source, destination)
        return
    url = mirror.rstrip("/") + "/" + filename
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
            declared = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise TransientError(f"HTTP {error.code} {error.reason} for {url}") from error
        raise NotOnMirror(f"HTTP {error.code} {error.reason} for {url}") from error
    except http.client.IncompleteRead as error:
        raise TransientError(
            f"truncated transfer of {url}: got {len(error.partial)} more bytes, "
            f"{error.expected} were still expected"
        ) from error
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise TransientError(f"{url}: {reason}") from error
    if declared is not None and received != int(declared):
        raise TransientError(f"truncated transfer of {url}: got {received} of {declared} bytes")


def decompress_and_hash(raw: Path, destination: Path) -> str:
    """Write the decompressed content of `raw` (gzip or plain) to `destination`; return its sha256."""
    with open(raw, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    digest = hashlib.sha256()
    opener = gzip.open if compressed else open
    try:
        with opener(raw, "rb") as source, open(destination, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # the data; a failing disk is no retry case
        raise TransientError(f"corrupt or truncated gzip data: {error}") from error
    return digest.hexdigest()


def expected_checksum(checksum) -> tuple:
    """A spec's checksum as (algorithm, hex): a bare string is a sha256."""
    if isinstance(checksum, str):
        return "sha256", checksum
    algorithm = "sha256" if checksum.get("sha256") else "md5"
    return algorithm, checksum[algorithm]


def install(raw: Path, verified: Path, checksum, archive: bool) -> str:
    """Install the fetched file `raw` at `verified` (an archive as it is, a data file decompressed);
    -> the digest that identifies it: md5 of the fetched file, or sha256 of what was installed."""
    algorithm, _ = expected_checksum(checksum)
    fetched_md5 = file_digest(raw, "md5") if algorithm == "md5" else None
    if archive:
        raw.replace(verified)
        return fetched_md5 or file_digest(verified, "sha256")
    installed_sha256 = decompress_and_hash(raw, verified)
    return fetched_md5 or installed_sha256


def fetch_verified(mirror: str, name: str, checksum, destination: Path, policy: RetryPolicy,
                   archive: bool = False) -> None:
    """Try `<name>.gz` then `<name>` on one mirror (an archive: `<name>` only), with retries, and install
    a verified copy."""
    algorithm, expected = expected_checksum(checksum)
    not_found = []
    for candidate in ((name,) if archive else (name + ".gz", name)):
        for attempt in range(1, policy.attempts + 1):
            try:
                with atomic_path(destination) as verified:
                    raw = verified.with_name(verified.name + ".raw")
                    try:
                        fetch_to(mirror, candidate, raw, policy.timeout_seconds)
                        actual = install(raw, verified, checksum, archive)
                    finally:
                        raw.unlink(missing_ok=True)
                    if actual != expected:
                        raise ChecksumMismatch(
                            f"checksum mismatch for {name} from {mirror} ({candidate}): "
                            f"expected {algorithm} {expected}, got {actual}"
                        )
                return
            except NotOnMirror as error:
                not_found.append(str(error))
                break
            except TransientError as error:
                if attempt == policy.attempts:
                    raise TransientError(f"{error} (gave up after {attempt} attempts)") from error
                delay = policy.backoff_seconds * 2 ** (attempt - 1)
                log.warning("attempt %d failed: %s; retrying in %.1fs", attempt, error, delay)
                time.sleep(delay)
    raise NotOnMirror("; ".join(not_found))


def download_file(name: str, checksum, mirrors: list, destination: Path, policy: RetryPolicy,
                  unreachable: dict, archive: bool = False) -> None:
    """Install `name` at `destination` from the first mirror that has it with the right content.

    `unreachable` maps mirrors that failed with a network error to that error, so that the other
    files of a dataset skip them instead of waiting through the same retries again.
    """
    failures = []
    for mirror in mirrors:
        if mirror in unreachable:
            failures.append(f"{mirror}: skipped, unreachable earlier ({unreachable[mirror]})")
            continue
        log.info("fetching %s from %s", name, mirror)
        try:
            fetch_verified(mirror, name, checksum, destination, policy, archive)
            log.info("installed %s from %s (%s %s)", destination, mirror, *expected_checksum(checksum))
            return
        except ChecksumMismatch as error:
            failures.append(f"{mirror}: {error}")
        except NotOnMirror as error:
            failures.append(f"{mirror}: not found ({error})")
        except TransientError as error:
            failures.append(f"{mirror}: {error}")
            if not is_local(mirror):
                unreachable[mirror] = str(error)
        log.warning("%s", failures[-1])
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise DownloadError(f"could not fetch {name} from any of {len(mirrors)} mirrors:\n{tried}")


def download_dataset(files: dict, mirrors: list, destinations: dict, policy: RetryPolicy,
                     archives: bool = False) -> None:
    """Fetch every file of a dataset. `files` maps a role to {name, sha256 or md5}; `destinations` a role
    to a path. archives: the files are archives, kept as fetched (formats other than idx)."""
    unreachable = {}
    installed = []
    try:
        for role, spec in files.items():
            destination = Path(destinations[role])
            download_file(spec["name"], spec, mirrors, destination, policy, unreachable, archives)
            installed.append(destination)
    except BaseException:
        # The files form one output set: a dataset with a file missing is no dataset.
        for path in installed:
            path.unlink(missing_ok=True)
        raise
