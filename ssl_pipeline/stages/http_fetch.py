"""Fetching one file from one mirror into a partial file: bounded, resumable, with progress.

At the scale of ImageNet (a 150 GB archive) a download must not trust the mirror: the bytes written stop at a
bound (the Content-Length, or what the caller knows the file may be), a broken connection or a killed job
continues where it stopped with an HTTP Range request, and a long transfer says how far it is. The partial
file lives outside the rule's outputs (ssl_pipeline/stages/download.py says where), so Snakemake, which deletes
the outputs of a failed job, leaves it for the next run. Beside it a small JSON file keeps the mirror's
validators (ETag, Last-Modified): a resumed request sends them as If-Range, so that a mirror whose file
changed answers with the whole new file instead of the rest of the old one.

Standard library only: the download rule's env has no third-party packages.
"""
import hashlib
import http.client
import json
import logging
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
HEAD_BYTES = 1 << 16  # what a head check may look at: enough for any IDX header, even a gzip'd one
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


class NotOnMirror(Exception):
    def __init__(self, message: str, status: int = None):
        super().__init__(message)
        self.status = status  # the HTTP status, where there was one


class TransientError(Exception):
    """Worth retrying: timeouts, refused or reset connections, 5xx answers, truncated transfers."""


class TooLarge(Exception):
    """The mirror sends more than the bound. Not retried: the same mirror would send the same bytes."""


@dataclass(frozen=True)
class Bound:
    """At most `limit` bytes; `why` says where that number comes from, for the error message."""
    limit: int
    why: str

    def tighter(self, other):
        return other if other is not None and other.limit < self.limit else self


# The first bytes of a file -> a tighter bound, or None where they do not tell (yet). It may raise to
# reject the file at once (ssl_pipeline/stages/download.py: an IDX name whose bytes are no IDX file).
HeadCheck = Callable[[bytes], Optional[Bound]]


@dataclass(frozen=True)
class Fetched:
    resumed_from: int  # bytes of an earlier attempt's partial file that this one continued; 0 when fresh
    size: int
    digest: str  # of the fetched bytes, with the algorithm asked for


class Partial:
    """A partial download and its validators: `<path>` and `<path>.json`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = self.path.with_name(self.path.name + ".json")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def validators(self) -> dict:
        try:
            return json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return {}

    def start(self, validators: dict) -> None:
        """Begin again from byte 0, remembering the validators of the answer that the bytes come from."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta.write_text(json.dumps(validators, sort_keys=True))
        self.path.write_bytes(b"")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Bytes, rate and ETA: a log line every `interval` seconds, and a bar redrawn in place when stderr is a
    terminal (a log file gets the lines only, so that it stays readable)."""

    BAR_SECONDS = 0.2

    def __init__(self, label: str, total: Optional[int], start: int, interval: float, stream=None):
        self.label, self.total, self.start, self.interval = label, total, start, interval
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty()
        self.began = self.last_line = self.last_bar = time.monotonic()
        self.done = start

    def status(self, now: float) -> str:
        rate = (self.done - self.start) / max(now - self.began, 1e-9)
        if self.total is None:
            return f"{human_bytes(self.done)} of an unknown total, {human_bytes(rate)}/s"
        eta = human_seconds((self.total - self.done) / rate) if rate > 0 else "unknown"
        share = 100 * self.done / max(self.total, 1)
        return (f"{human_bytes(self.done)} of {human_bytes(self.total)} ({share:.1f}%), "
                f"{human_bytes(rate)}/s, ETA {eta}")

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            if self.bar:
                self.stream.write("\r\x1b[K")
            log.info("%s: %s", self.label, self.status(now))
        if self.bar and now - self.last_bar >= self.BAR_SECONDS:
            self.last_bar = now
            filled = int(30 * self.done / self.total) if self.total else 0
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.status(now)}")
            self.stream.flush()

    def finish(self) -> None:
        if self.bar:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        seconds = time.monotonic() - self.began
        log.info("%s: %s in %.1f s (%s/s)", self.label, human_bytes(self.done - self.start), seconds,
                 human_bytes((self.done - self.start) / max(seconds, 1e-9)))


class Sink:
    """Appends a stream to the partial file: hashes it, stops before the bound, applies the head check."""

    def __init__(self, partial: Partial, offset: int, bound: Bound, head_check: Optional[HeadCheck],
                 algorithm: str, label: str):
        self.partial, self.written, self.bound, self.label = partial, offset, bound, label
        self.digest = hashlib.new(algorithm)
        self.head_check, self.head = head_check, b""
        self.refuse_beyond(offset)
        with open(partial.path, "rb") as earlier:  # a resumed file: its bytes so far count too
            while chunk := earlier.read(CHUNK_BYTES):
                self.digest.update(chunk)
                self.check_head(chunk)
        self.out = open(partial.path, "ab")

    def check_head(self, chunk: bytes) -> None:
        if self.head_check is None or len(self.head) >= HEAD_BYTES:
            return
        self.head += chunk[:HEAD_BYTES - len(self.head)]
        found = self.head_check(self.head)
        if found is not None:
            self.head_check = None
            self.bound = self.bound.tighter(found)
            self.refuse_beyond(self.written)

    def refuse_beyond(self, size: int) -> None:
        if size > self.bound.limit:
            raise TooLarge(f"{self.label} is larger than the {self.bound.limit} bytes of {self.bound.why}: "
                           f"the download stopped at {self.written} bytes")

    def write(self, chunk: bytes) -> None:
        self.refuse_beyond(self.written + len(chunk))  # nothing past the bound reaches the disk
        self.out.write(chunk)
        self.digest.update(chunk)
        self.written += len(chunk)
        self.check_head(chunk)

    def close(self) -> None:
        self.out.close()


def copy_local(source: Path, partial: Partial, bound: Bound, head_check: Optional[HeadCheck], algorithm: str,
               progress_seconds: float, label: str) -> Fetched:
    """A local mirror: the same bounds and checks, always from byte 0 (a local copy is cheap to redo)."""
    if not source.is_file():
        raise NotOnMirror(f"{source} does not exist")
    size = source.stat().st_size
    if size > bound.limit:
        raise TooLarge(f"{label} is larger than the {bound.limit} bytes of {bound.why}: {source} has {size}")
    partial.start({})
    sink = Sink(partial, 0, bound, head_check, algorithm, label)
    progress = Progress(label, size, 0, progress_seconds)
    try:
        with open(source, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                sink.write(chunk)
                progress.update(sink.written)
    except TooLarge:
        partial.discard()
        raise
    finally:
        sink.close()
    progress.finish()
    return Fetched(0, sink.written, sink.digest.hexdigest())


def validators_of(response) -> dict:
    return {key: response.headers[header] for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified"))
            if response.headers.get(header)}


def changed(stored: dict, now: dict) -> Optional[str]:
    """How the mirror's validators show that its file is no longer the one the partial file came from."""
    for key in ("etag", "last_modified"):
        if stored.get(key) and now.get(key) and stored[key] != now[key]:
            return f"{key.replace('_', '-')} {stored[key]} became {now[key]}"
    return None


def open_url(url: str, headers: dict, timeout: float):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise TransientError(f"HTTP {error.code} {error.reason} for {url}") from error
        raise NotOnMirror(f"HTTP {error.code} {error.reason} for {url}", error.code) from error
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as error:
        raise TransientError(f"{url}: {getattr(error, 'reason', error)}") from error


def resume_request(url: str, partial: Partial, label: str, timeout: float):
    """Ask for the rest of the partial file (or for all of it); -> (response, offset, total or None), the
    partial file then holding exactly `offset` bytes of the file the response's bytes continue."""
    have, stored = partial.size(), partial.validators()
    headers = {}
    if have:
        headers["Range"] = f"bytes={have}-"
        # A strong ETag, else the date: a server whose file changed then sends all of the new one (RFC 9110).
        validator = stored.get("etag") if not stored.get("etag", "W/").startswith("W/") else None
        if validator or stored.get("last_modified"):
            headers["If-Range"] = validator or stored["last_modified"]
    try:
        response = open_url(url, headers, timeout)
    except NotOnMirror as error:
        if have and error.status == 416:  # Range Not Satisfiable: the partial file is no prefix of the file
            log.warning("%s: the mirror refused to resume at byte %d (HTTP 416): starting again from byte 0",
                        label, have)
            partial.discard()
            return resume_request(url, partial, label, timeout)
        raise
    now = validators_of(response)
    if response.status == 206:
        match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        why = changed(stored, now)
        if match and int(match.group(1)) == have and not why:
            if have:
                log.info("%s: resuming a partial file at byte %d (%s)", label, have, partial.path)
            else:
                partial.start(now)
            total = None if match.group(3) == "*" else int(match.group(3))
            return response, have, total
        response.close()
        answered = response.headers.get("Content-Range")
        if not have:
            raise TransientError(f"{url}: HTTP 206 with Content-Range {answered!r} to a request for the whole file")
        why = why or f"it answered Range bytes={have}- with Content-Range {answered!r}"
        log.warning("%s: the mirror's file cannot continue the partial file (%s): starting again from byte 0",
                    label, why)
        partial.discard()
        return resume_request(url, partial, label, timeout)
    if have:
        why = changed(stored, now)
        log.warning("%s: the mirror answered the resume request with the whole file (%s): starting again from "
                    "byte 0", label, f"its file changed: {why}" if why else "it ignores Range")
    partial.start(now)
    declared = response.headers.get("Content-Length")
    return response, 0, int(declared) if declared is not None else None


def fetch_http(url: str, partial: Partial, bound: Bound, head_check: Optional[HeadCheck], algorithm: str,
               timeout: float, progress_seconds: float, label: str) -> Fetched:
    """Bring `partial` up to the whole file at `url`, continuing what an earlier attempt left."""
    response, offset, total = resume_request(url, partial, label, timeout)
    sink = None
    try:
        with response:
            if total is not None and total > bound.limit:  # refused before a byte is written
                raise TooLarge(f"{label} is larger than the {bound.limit} bytes of {bound.why}: the mirror "
                               f"declares {total} bytes")
            sink = Sink(partial, offset, bound, head_check, algorithm, label)
            progress = Progress(label, total, offset, progress_seconds)
            # Without a Content-Length the body ends where the server closes: the bound stops it before that.
            while chunk := response.read1(CHUNK_BYTES):  # what has arrived: read() would wait for all 1 MiB
                sink.write(chunk)
                progress.update(sink.written)
    except TooLarge:
        partial.discard()
        raise
    except http.client.IncompleteRead as error:
        raise TransientError(f"truncated transfer of {url}: got {sink.written if sink else offset} bytes, "
                             f"{error.expected} more were expected; the partial file is kept") from error
    except (socket.timeout, ConnectionError, http.client.HTTPException, urllib.error.URLError) as error:
        raise TransientError(f"{url}: {getattr(error, 'reason', error)} after {sink.written if sink else offset} "
                             f"bytes; the partial file is kept") from error
    finally:
        if sink is not None:
            sink.close()
    if total is not None and sink.written != total:
        raise TransientError(f"truncated transfer of {url}: got {sink.written} of {total} bytes; the partial file "
                             "is kept")
    progress.finish()
    return Fetched(offset, sink.written, sink.digest.hexdigest())


def move(source: Path, destination: Path) -> None:
    """Rename, or copy where the two lie on different file systems."""
    try:
        source.replace(destination)
    except OSError:
        shutil.move(str(source), str(destination))
