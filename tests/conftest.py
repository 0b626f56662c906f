"""Shared fixtures: synthetic IDX datasets, a real HTTP server on loopback, and system requirements."""
import gzip
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_pipeline.datasets.idx import encode_idx

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SMOKE = ("--configfile", "config/experiments/smoke.yaml")
# Tests of what happens on a machine without CUDA; on a GPU machine they are moot.
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
# Set by the GPU check (ssl_pipeline/tools/gpu_check.py) when it runs the tests: there a missing GPU is an error.
GPU_CHECK = "SSL_PIPELINE_GPU_CHECK"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked gpu skip where torch finds no CUDA device, before their fixtures touch one; inside
    the GPU check (SSL_PIPELINE_GPU_CHECK=1) they fail instead, so that a GPU run that lost its GPU
    cannot pass by skipping them."""
    if item.get_closest_marker("gpu") is None or torch.cuda.is_available():
        return
    if os.environ.get(GPU_CHECK) == "1":
        pytest.fail(f"{GPU_CHECK}=1 (the GPU check) but CUDA is not available: torch.cuda.is_available() is "
                    f"False (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})", pytrace=False)
    pytest.skip("needs an NVIDIA GPU: torch.cuda.is_available() is False")


def require(condition: bool, what: str) -> None:
    """Skip a test whose system component is missing; under CI=true that is a failure instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {what}")
    pytest.skip(what)


# ---------------------------------------------------------------------------------------------------
# Synthetic IDX datasets
# ---------------------------------------------------------------------------------------------------

def synthetic_images(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """One bright bar per image whose orientation and position depend on the class, plus noise, so
    classes are learnable, and flips and small crops keep them apart."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(len(labels), size, size), dtype=np.uint8)
    num_classes = int(labels.max()) + 1
    for index, label in enumerate(labels):
        position = 1 + (label * (size - 3)) // max(1, num_classes - 1)
        jitter = rng.integers(-1, 2)
        row = int(np.clip(position + jitter, 0, size - 2))
        if label % 2 == 0:
            images[index, row:row + 2, 1:-1] = 230
        else:
            images[index, 1:-1, row:row + 2] = 230
    return images


def write_synthetic_idx(directory: Path, num_classes=3, size=12, train_per_class=60, test_per_class=20,
                        compress=True) -> dict:
    """Write the four IDX files of a small dataset; return the config `files` section for it."""
    directory.mkdir(parents=True, exist_ok=True)
    train_labels = np.repeat(np.arange(num_classes, dtype=np.uint8), train_per_class)
    test_labels = np.repeat(np.arange(num_classes, dtype=np.uint8), test_per_class)
    arrays = {
        "train_images": synthetic_images(train_labels, size, seed=1),
        "train_labels": train_labels,
        "test_images": synthetic_images(test_labels, size, seed=2),
        "test_labels": test_labels,
    }
    files = {}
    for role, array in arrays.items():
        name = f"synthetic-{role.replace('_', '-')}-idx"
        content = encode_idx(array)
        target = directory / (name + ".gz" if compress else name)
        target.write_bytes(gzip.compress(content, mtime=0) if compress else content)
        files[role] = {"name": name, "sha256": hashlib.sha256(content).hexdigest()}
    return files


@pytest.fixture
def synthetic_mirror(tmp_path):
    """A directory holding a gzip-compressed synthetic dataset, and its config `files` section."""
    directory = tmp_path / "mirror"
    return directory, write_synthetic_idx(directory)


# ---------------------------------------------------------------------------------------------------
# HTTP server on loopback
# ---------------------------------------------------------------------------------------------------

class Routes:
    """What the server answers for each path: ('ok', body) | ('status', code) |
    ('truncate', body, bytes_sent) | ('flaky', failures, body): 503 for the first `failures` requests."""

    def __init__(self):
        self.table = {}
        self.requests = []

    def count(self, path):
        return sum(1 for requested in self.requests if requested == path)


def make_handler(routes: Routes):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            routes.requests.append(self.path)
            route = routes.table.get(self.path, ("status", 404))
            kind = route[0]
            if kind == "flaky" and routes.count(self.path) <= route[1]:
                route = ("status", 503)
            elif kind == "flaky":
                route = ("ok", route[2])
            if route[0] == "status":
                self.send_error(route[1])
                return
            body = route[1]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            sent = body if route[0] == "ok" else body[:route[2]]
            self.wfile.write(sent)
            if route[0] == "truncate":
                self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1; yields (base_url, routes)."""
    routes = Routes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(routes))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def serve_directory(routes: Routes, directory: Path, prefix: str = "") -> None:
    for path in directory.iterdir():
        routes.table[f"{prefix}/{path.name}"] = ("ok", path.read_bytes())


# ---------------------------------------------------------------------------------------------------
# Workflow copies
# ---------------------------------------------------------------------------------------------------

WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "envs", "profiles", "ssl_pipeline"]


def copy_workflow(destination: Path) -> Path:
    """A copy of the workflow as a fresh clone has it, without results or Snakemake state."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / part)
    return destination


def tool_env(extra=None) -> dict:
    """The environment for the project's tools: this interpreter's bin first on PATH, so that
    Snakemake's rules (and DVC's stages) find its `python` and `snakemake`."""
    return {**os.environ, **(extra or {}), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def snakemake(workdir: Path, *args, check=True, env=None) -> subprocess.CompletedProcess:
    """Run the Snakemake of this interpreter's environment."""
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=tool_env(env),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def real_smoke_run(tmp_path_factory):
    """The smoke experiment on the real Fashion-MNIST, run once per test session by local Snakemake.
    Returns (workdir, wall seconds). Tests must not change its results; copy what they change."""
    require(DEBIAN_FASHION_MNIST.is_dir(),
            f"{DEBIAN_FASHION_MNIST} is missing: install Debian's package dataset-fashion-mnist")
    workdir = copy_workflow(tmp_path_factory.mktemp("real_smoke") / "workflow")
    started = time.perf_counter()
    snakemake(workdir, "--cores", "2", *SMOKE)
    return workdir, time.perf_counter() - started
