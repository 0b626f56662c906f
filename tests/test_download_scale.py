"""Downloads at the scale of ImageNet, against a real HTTP server on loopback that misbehaves: bounded (a gzip
bomb, an archive over its size, a body over the cap), resumed with Range after a cut connection and after a
killed job, a file that changed on the mirror in between, and progress lines in the log."""
import email.utils
import gzip
import hashlib
import http.server
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, SMOKE, copy_workflow, snakemake, write_synthetic_idx
from ssl_pipeline.stages.download import DownloadError, RetryPolicy, download_dataset, download_file, partial_file
from ssl_pipeline.stages.http_fetch import Progress

FAST = RetryPolicy(attempts=3, backoff_seconds=0.01, timeout_seconds=5, max_bytes=10**9, progress_seconds=10)
ONCE = RetryPolicy(attempts=1, backoff_seconds=0, timeout_seconds=5, max_bytes=10**9, progress_seconds=10)
ARCHIVE = os.urandom(1_000_000)  # incompressible, like a tar of JPEGs


def spec(content: bytes, name="data.tar", size=None) -> dict:
    return {"name": name, "sha256": hashlib.sha256(content).hexdigest(), "size": size}


class Mirror:
    """What the server serves and how it misbehaves; what it was asked (path, Range, If-Range) and sent."""

    def __init__(self):
        self.files = {}
        self.ranges = True  # honour Range requests
        self.validator = "ETag"  # the validator it sends and honours in If-Range: ETag, Last-Modified or None
        self.content_length = True
        self.cuts = []  # body bytes after which the next responses close the socket, one entry each
        self.trickle = 0.0  # seconds between 16 KiB chunks
        self.range_shift = 0  # a wrong Content-Range start, when not 0
        self.requests = []
        self.sent = []  # body bytes, one entry per request


def make_handler(mirror: Mirror):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            wanted, validator = self.headers.get("Range"), self.headers.get("If-Range")
            mirror.requests.append((self.path, wanted, validator))
            mirror.sent.append(0)
            index = len(mirror.sent) - 1
            body = mirror.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            digest = hashlib.sha256(body).digest()
            etag = {"ETag": f'"{digest.hex()[:16]}"',  # a date that changes with the content, for Last-Modified
                    "Last-Modified": email.utils.formatdate(int.from_bytes(digest[:3], "big"), usegmt=True),
                    None: None}[mirror.validator]
            start = 0
            if wanted and mirror.ranges and (validator is None or validator == etag):
                start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
                if start >= len(body):
                    self.send_error(416)
                    return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start + mirror.range_shift}-{len(body) - 1}/{len(body)}")
            if etag:
                self.send_header(mirror.validator, etag)
            if mirror.content_length:
                self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if mirror.cuts:
                payload = payload[:mirror.cuts.pop(0)]
            for offset in range(0, len(payload), 1 << 14):
                try:
                    self.wfile.write(payload[offset:offset + (1 << 14)])
                except OSError:  # the client stopped reading
                    return
                mirror.sent[index] += len(payload[offset:offset + (1 << 14)])
                time.sleep(mirror.trickle)
            self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def mirror():
    """A Range-aware HTTP server on 127.0.0.1; yields (base_url, Mirror)."""
    state = Mirror()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def written_bytes() -> int:
    """Bytes this process has passed to write(2) so far (wchar: the server's send(2) on sockets is not in it)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("wchar")).split()[1])


def client_writes(action) -> int:
    before = written_bytes()
    action()
    return written_bytes() - before


def files_in(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Bounded
# ---------------------------------------------------------------------------------------------------

def test_gzip_bomb_on_an_idx_name_stops_at_the_size_its_header_declares(mirror, tmp_path):
    url, state = mirror
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (100, 28, 28))  # 78,416 bytes in all
    real = header + bytes(78_400)
    state.files["/train-images.gz"] = gzip.compress(header + bytes(30_000_000), compresslevel=9)  # 30 kB
    out = tmp_path / "raw"

    def fetch():
        with pytest.raises(DownloadError) as error:
            download_file("train-images", spec(real)["sha256"], [url], out / "train-images", FAST, {},
                          partial_dir=tmp_path / "partial")
        fetch.message = str(error.value)

    written = client_writes(fetch)
    assert f"train-images from {url} (train-images.gz) decompresses to more than the 78416 bytes of the size " \
           "its IDX header declares (78416)" in fetch.message
    assert written < 500_000  # the compressed 30 kB and at most the 78 kB it declares; not 30 MB
    assert files_in(out) == [] and files_in(tmp_path / "partial") == []
    assert state.requests == [("/train-images.gz", None, None)]  # too large: not retried, nor tried as plain


@pytest.mark.parametrize("content_length", [True, False])
def test_an_archive_larger_than_its_spec_size_is_refused(mirror, tmp_path, content_length):
    url, state = mirror
    state.content_length = content_length
    state.files["/data.tar"] = ARCHIVE
    out = tmp_path / "raw"

    def fetch():
        with pytest.raises(DownloadError) as error:
            download_dataset({"archive": spec(ARCHIVE, size=300_000)}, [url], {"archive": out / "data.tar"}, FAST,
                             archives=True, partial_dir=tmp_path / "partial")
        fetch.message = str(error.value)

    written = client_writes(fetch)
    assert f"data.tar from {url} (data.tar) is larger than the 300000 bytes of its size in the config" in fetch.message
    assert ("the mirror declares 1000000 bytes" in fetch.message) == content_length
    assert written < (50_000 if content_length else 350_000)  # refused at once, or stopped at the size
    assert files_in(out) == [] and files_in(tmp_path / "partial") == []


def test_a_body_without_content_length_stops_at_the_cap_and_is_written_once(mirror, tmp_path):
    """Bodies without Content-Length used to be written twice: an IDX file served plain was fetched to a raw
    copy, then copied to the output beside it (6,000,016 bytes written for a 3,000,008-byte file). Now the
    fetched file is renamed into place."""
    url, state = mirror
    state.content_length = False
    state.files["/data.tar"] = ARCHIVE
    capped = RetryPolicy(attempts=1, backoff_seconds=0, timeout_seconds=5, max_bytes=200_000)
    with pytest.raises(DownloadError, match=r"data.tar from .* is larger than the 200000 bytes of "
                                            r"download.max_bytes \(200000\)"):
        download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "raw" / "data.tar", capped, {}, archive=True)
    assert files_in(tmp_path / "raw") == []

    images = b"\x00\x00\x08\x01" + len(ARCHIVE).to_bytes(4, "big") + ARCHIVE  # no images.gz on this mirror
    state.files["/images"] = images
    written = client_writes(lambda: download_file("images", spec(images)["sha256"], [url], tmp_path / "raw" / "images",
                                                  FAST, {}))
    assert (tmp_path / "raw" / "images").read_bytes() == images
    assert len(images) <= written < 1.1 * len(images)


def test_a_non_idx_body_on_an_idx_name_stops_at_once(mirror, tmp_path):
    url, state = mirror
    state.content_length = False
    state.files["/labels"] = b"<html>" + bytes(5_000_000)  # a mirror's error page, say, or worse
    with pytest.raises(DownloadError, match=r"labels from .* \(labels\): not an IDX file: it starts with "
                                            r"0x3c68746d"):
        download_file("labels", "0" * 64, [url], tmp_path / "raw" / "labels", FAST, {})
    assert files_in(tmp_path / "raw") == []


# ---------------------------------------------------------------------------------------------------
# Resumable
# ---------------------------------------------------------------------------------------------------

def test_a_cut_connection_continues_with_range(mirror, tmp_path, caplog):
    url, state = mirror
    state.files["/data.tar"] = ARCHIVE
    state.cuts = [300_000, 300_000]  # two responses end early, the socket closed
    caplog.set_level(logging.INFO)
    download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "raw" / "data.tar", FAST, {}, archive=True,
                  partial_dir=tmp_path / "partial")
    assert (tmp_path / "raw" / "data.tar").read_bytes() == ARCHIVE
    etag = f'"{hashlib.sha256(ARCHIVE).hexdigest()[:16]}"'
    assert state.requests == [("/data.tar", None, None), ("/data.tar", "bytes=300000-", etag),
                              ("/data.tar", "bytes=600000-", etag)]
    assert state.sent == [300_000, 300_000, 400_000]  # each byte once: sum(state.sent) < 2 * len(ARCHIVE)
    assert "resuming a partial file at byte 600000" in caplog.text
    assert files_in(tmp_path / "partial") == []  # installed: its partial file is gone


def download_command(url, content, tmp_path, progress_seconds=0.05):
    settings = {"dataset": {"format": "image_folder", "archive": spec(content), "mirrors": [url]},
                "download": {"attempts": 1, "backoff_seconds": 0, "timeout_seconds": 5, "max_bytes": 10**9}}
    return [sys.executable, "-m", "ssl_pipeline", "download", "--settings", json.dumps(settings),
            "--out-dir", str(tmp_path / "raw"), "--partial-dir", str(tmp_path / "partial"),
            "--progress-seconds", str(progress_seconds)]


def test_a_killed_job_leaves_a_partial_file_that_the_next_run_continues(mirror, tmp_path):
    url, state = mirror
    state.files["/data.tar"] = ARCHIVE
    state.trickle = 0.01  # 16 KiB every 10 ms: about 0.6 s for the file
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        job = subprocess.Popen(download_command(url, ARCHIVE, tmp_path), cwd=REPO, stderr=handle,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    partial = lambda: [p for p in (tmp_path / "partial").rglob("*.partial")]  # noqa: E731
    deadline = time.monotonic() + 20
    while not (partial() and partial()[0].stat().st_size > 300_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    left = partial()[0].stat().st_size
    assert 300_000 < left < len(ARCHIVE) and not (tmp_path / "raw" / "data.tar").exists()
    assert re.search(r"data.tar from .*: \d+\.\d kB of 1\.0 MB \(\d+\.\d%\), .*/s, ETA \d:\d\d:\d\d", log.read_text())

    state.trickle = 0.0
    second = subprocess.run(download_command(url, ARCHIVE, tmp_path), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "raw" / "data.tar").read_bytes() == ARCHIVE
    assert state.requests[-1][1] == f"bytes={left}-"
    assert state.sent[-1] == len(ARCHIVE) - left and len(state.requests) == 2
    assert f"resuming a partial file at byte {left}" in second.stderr
    assert partial() == []


def leave_partial_file(url, state, content, tmp_path, expected=ARCHIVE):
    """A first run that fails after 400 kB (one attempt only): its partial file stays for the next."""
    state.files["/data.tar"] = content
    state.cuts = [400_000]
    with pytest.raises(DownloadError, match="truncated transfer"):
        download_file("data.tar", spec(expected), [url], tmp_path / "raw" / "data.tar", ONCE, {}, archive=True,
                      partial_dir=tmp_path / "partial")
    assert [p.stat().st_size for p in (tmp_path / "partial").rglob("*.partial")] == [400_000]


@pytest.mark.parametrize("validator", ["ETag", "Last-Modified", None])
def test_a_file_that_changed_on_the_mirror_is_fetched_again_from_byte_0(mirror, tmp_path, caplog, validator):
    """The mirror first served a wrong file (cut mid-way), then the right one. With a validator, If-Range makes it
    send the whole new file; without, the checksum of the resumed file fails, and it starts again once."""
    url, state = mirror
    state.validator = validator
    leave_partial_file(url, state, bytes(len(ARCHIVE)), tmp_path)
    state.files["/data.tar"] = ARCHIVE
    caplog.set_level(logging.INFO)
    download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "raw" / "data.tar", ONCE, {}, archive=True,
                  partial_dir=tmp_path / "partial")
    assert (tmp_path / "raw" / "data.tar").read_bytes() == ARCHIVE
    second_run = [request[1] for request in state.requests[1:]]
    if validator:
        assert second_run == ["bytes=400000-"]  # If-Range did not match: 200, the whole new file
        assert f"data.tar from {url} (data.tar): the mirror answered the resume request with the whole file " \
               f"(its file changed: {validator.lower()}" in caplog.text
    else:
        assert second_run == ["bytes=400000-", None]  # resumed, failed the checksum, then once from byte 0
        assert f"checksum mismatch for data.tar from {url} (data.tar) after resuming a partial file at byte " \
               "400000: the mirror's file has changed" in caplog.text


def test_a_resumed_file_that_fails_again_from_byte_0_is_an_error_not_a_loop(mirror, tmp_path):
    url, state = mirror
    state.validator = None
    leave_partial_file(url, state, bytes(len(ARCHIVE)), tmp_path)
    state.files["/data.tar"] = b"\x01" * len(ARCHIVE)  # still not the file the spec names
    with pytest.raises(DownloadError, match=r"checksum mismatch for data.tar .* \(also when fetched again from "
                                            r"byte 0\)"):
        download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "raw" / "data.tar", FAST, {}, archive=True,
                      partial_dir=tmp_path / "partial")
    assert len(state.requests) == 3 and files_in(tmp_path / "partial") == []
    assert not (tmp_path / "raw").exists() or files_in(tmp_path / "raw") == []


@pytest.mark.parametrize("misbehaviour", ["ignores Range", "wrong Content-Range"])
def test_a_mirror_that_cannot_resume_starts_again_from_byte_0(mirror, tmp_path, caplog, misbehaviour):
    url, state = mirror
    leave_partial_file(url, state, ARCHIVE, tmp_path)
    state.ranges = misbehaviour != "ignores Range"
    state.range_shift = 1000 if misbehaviour == "wrong Content-Range" else 0
    caplog.set_level(logging.INFO)
    download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "raw" / "data.tar", ONCE, {}, archive=True,
                  partial_dir=tmp_path / "partial")
    assert (tmp_path / "raw" / "data.tar").read_bytes() == ARCHIVE
    expected = "it ignores Range" if misbehaviour == "ignores Range" else \
        "cannot continue the partial file (it answered Range bytes=400000- with Content-Range 'bytes 401000-"
    assert expected in caplog.text and "starting again from byte 0" in caplog.text


def test_a_partial_file_longer_than_the_mirrors_file_starts_again_from_byte_0(mirror, tmp_path, caplog):
    url, state = mirror
    state.validator = None
    shorter = ARCHIVE[:300_000]
    leave_partial_file(url, state, ARCHIVE, tmp_path, expected=shorter)
    state.files["/data.tar"] = shorter
    caplog.set_level(logging.INFO)
    download_file("data.tar", spec(shorter), [url], tmp_path / "raw" / "data.tar", ONCE, {}, archive=True,
                  partial_dir=tmp_path / "partial")
    assert (tmp_path / "raw" / "data.tar").read_bytes() == shorter
    assert [request[1] for request in state.requests[1:]] == ["bytes=400000-", None]
    assert "refused to resume at byte 400000 (HTTP 416): starting again from byte 0" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------

def test_progress_lines_give_bytes_rate_and_eta(mirror, tmp_path, caplog):
    url, state = mirror
    state.files["/data.tar"] = ARCHIVE
    state.trickle = 0.005
    caplog.set_level(logging.INFO)
    ticking = RetryPolicy(attempts=1, backoff_seconds=0, timeout_seconds=5, progress_seconds=0.05)
    download_file("data.tar", spec(ARCHIVE), [url], tmp_path / "data.tar", ticking, {}, archive=True)
    lines = re.findall(r"data.tar from .*: (\d+\.\d) kB of 1\.0 MB \((\d+\.\d)%\), [\d.]+ [kM]B/s, "
                       r"ETA \d:\d\d:\d\d", caplog.text)
    assert len(lines) >= 2
    assert [float(done) for done, _ in lines] == sorted(float(done) for done, _ in lines)
    assert re.search(r"data.tar from .*: 1\.0 MB in [\d.]+ s \([\d.]+ [kM]B/s\)", caplog.text)


def test_on_a_terminal_a_progress_bar_is_redrawn_in_place():
    """stderr a terminal (a real pseudo-terminal here): a bar, redrawn with a carriage return, then erased."""
    controller, terminal_fd = os.openpty()
    with open(terminal_fd, "w") as terminal:
        progress = Progress("data.tar", 1000, 0, interval=60, stream=terminal)
        time.sleep(Progress.BAR_SECONDS + 0.01)
        progress.update(500)
        progress.finish()
    shown = os.read(controller, 4096).decode()
    os.close(controller)
    assert shown.startswith("\r[" + "#" * 15 + "." * 15 + "] 500 B of 1.0 kB (50.0%), ")
    assert shown.endswith("\r\x1b[K")


def test_the_download_rule_resumes_from_results_resume_and_ignores_progress_seconds(mirror, tmp_path):
    """A real Snakemake run of the rule, then a dry run: a partial file that a killed job left in
    results/resume/download/ is continued, and editing download.progress_seconds then reruns nothing.
    7-9 s on 2 shared cores, most of it Snakemake starting twice."""
    url, state = mirror
    served = write_synthetic_idx(tmp_path / "served", num_classes=3, size=28, train_per_class=100)  # 16 chunks of gzip
    for path in (tmp_path / "served").iterdir():
        state.files[f"/{path.name}"] = path.read_bytes()
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "mirror.yaml").write_text(json.dumps({"dataset": {"mirrors": [url], "files": served}}))
    images = served["train_images"]
    gz = state.files[f"/{images['name']}.gz"]
    left = partial_file(workdir / "results" / "resume" / "download", url, images["name"] + ".gz", images)
    left.start({"etag": f'"{hashlib.sha256(gz).hexdigest()[:16]}"'})
    left.path.write_bytes(gz[:1000])
    # Progress lines every 20 ms while the mirror trickles (16 KiB every 10 ms), in the rule's own log.
    (workdir / "ticking.yaml").write_text(json.dumps({"download": {"progress_seconds": 0.02}}))
    state.trickle = 0.01
    snakemake(workdir, "--cores", "1", *SMOKE, "--configfile", "mirror.yaml", "ticking.yaml", "--", "download")
    assert (f"/{images['name']}.gz", "bytes=1000-", f'"{hashlib.sha256(gz).hexdigest()[:16]}"') in state.requests
    log = (workdir / "results" / "logs" / "download.log").read_text()
    assert "resuming a partial file at byte 1000" in log
    assert re.search(rf"{images['name']} from {url} \({images['name']}.gz\): [\d.]+ kB of [\d.]+ kB \([\d.]+%\), "
                     r"[\d.]+ [kM]B/s, ETA \d:\d\d:\d\d", log), log
    assert files_in(workdir / "results" / "resume" / "download") == []
    (workdir / "slower.yaml").write_text(json.dumps({"download": {"progress_seconds": 60}}))
    plan = snakemake(workdir, "-n", "--cores", "1", *SMOKE, "--configfile", "mirror.yaml", "slower.yaml", "--",
                     "download").stdout
    assert "Nothing to be done" in plan
