"""The offline GPU node's bundle (ssl_pipeline/tools/gpu_bundle.py) and the bundle side of the GPU check.

The bundle's whole run is `make gpu-rehearsal`, which .ci/run runs before the tests; here: what the bundle
holds, that a failed build leaves nothing, and that the check refuses a bundle that lacks a wheel, on the
emulated node image (.gpu-rehearsal/venv: Python 3.12 without the bundle's packages).
"""
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_pipeline.tools.gpu_bundle import RUN_SCRIPT, read_pins
from ssl_pipeline.tools.gpu_check import copy_checkout
from tests.conftest import REPO, require

BUNDLE = REPO / "gpu-bundle"
REHEARSAL_PYTHON = REPO / ".gpu-rehearsal" / "venv" / "bin" / "python"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build_bundle(out: Path, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_pipeline.tools.gpu_bundle", "--out", str(out), *arguments],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The bundle `make gpu-rehearsal` built (CI builds it first) if it is this checkout's, else a fresh one
    (about 10 s)."""
    if (BUNDLE / "manifest.json").is_file() and (BUNDLE / "run").read_text() == RUN_SCRIPT:
        return BUNDLE
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    done = build_bundle(out)
    assert done.returncode == 0, done.stderr
    return out


def test_bundle_holds_one_wheel_per_pin_the_data_and_a_true_manifest(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["files"]
    assert manifest["python_version"] == "3.12"
    # At most 60 MiB with the manifest: the node takes 64 MiB in all, the checkout is under 1 MiB.
    total = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file() and "site-packages" not in
                path.parts)
    assert total <= 60 * 2 ** 20
    for name, entry in files.items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == entry["sha256"], name
    wheels = sorted(name for name in files if name.startswith("wheels/"))
    pins = read_pins(REPO / "requirements-gpu-node.txt")
    assert len(wheels) == len(pins)
    for name, version in pins:
        prefix = f"wheels/{name.lower().replace('-', '_')}-{version}-"
        matching = [wheel for wheel in wheels if wheel.lower().startswith(prefix)]
        assert len(matching) == 1, (name, version)
        tags = matching[0].rsplit("-", 3)[1:]
        assert tags[0] in ("py3", "py2.py3", "cp312") and (tags[2].startswith(("any", "manylinux"))), matching[0]
    # connection-pool exists only as an sdist: the bundle holds the pure wheel built from it.
    assert any(name.startswith("wheels/connection_pool-0.0.3-py3-none-any") for name in wheels)
    # The default config's four IDX files, as compressed as a mirror holds them, with their true content.
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for spec in config["dataset"]["files"].values():
        data = gzip.decompress((bundle / "data" / (spec["name"] + ".gz")).read_bytes())
        assert hashlib.sha256(data).hexdigest() == spec["sha256"]
    assert os.access(bundle / "run", os.X_OK)


def test_a_bundle_over_its_size_limit_fails_and_leaves_nothing(tmp_path):
    out = tmp_path / "gpu-bundle"
    done = build_bundle(out, "--max-mib", "20")
    assert done.returncode == 1
    assert re.search(r"the bundle would be \d+\.\d MiB, over --max-mib 20", done.stderr), done.stderr
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its .partial build folder


def test_a_pin_without_a_version_is_an_error_naming_the_line(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nsnakemake==9.27.1\njsonschema>=4\n")
    done = build_bundle(tmp_path / "gpu-bundle", "--requirements", str(requirements))
    assert done.returncode == 1
    assert f"{requirements}:3: 'jsonschema>=4' is not pinned as name==version" in done.stderr
    assert not (tmp_path / "gpu-bundle").exists()


@pytest.fixture(scope="module")
def node_python() -> Path:
    """The emulated node image's Python (built by `.ci/gpu-rehearsal --venv-only`, about 90 s if absent)."""
    require(shutil.which("python3.12") is not None, "pyenv's python3.12 is missing (the rehearsal's Python)")
    if not REHEARSAL_PYTHON.is_file():
        subprocess.run([str(REPO / ".ci" / "gpu-rehearsal"), "--venv-only"], cwd=REPO, check=True)
    return REHEARSAL_PYTHON


def run_from_bundle(checkout: Path, python: Path) -> subprocess.CompletedProcess:
    """gpu-bundle/run as the rehearsal starts it: a clean environment, only the node's Python."""
    return subprocess.run([str(checkout / "gpu-bundle" / "run"), "--device", "cpu", "--tiny", "--steps", "tests"],
                          cwd=checkout, capture_output=True, text=True, timeout=300,
                          env={"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", "/root"), "PYTHON": str(python)})


def test_the_bundle_run_without_cuda_stops_at_once_before_installing(bundle, node_python, tmp_path):
    checkout = copy_checkout(tmp_path / "node")
    shutil.copytree(bundle, checkout / "gpu-bundle", ignore=shutil.ignore_patterns("site-packages"))
    done = subprocess.run([str(checkout / "gpu-bundle" / "run")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": CLEAN_PATH, "PYTHON": str(node_python), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gpu-check: make gpu-check needs an NVIDIA GPU that PyTorch can use")
    assert not (checkout / "gpu-bundle" / "site-packages").exists()
    assert not (checkout / "results").exists()


def test_the_check_refuses_a_bundle_that_lacks_a_wheel(bundle, node_python, tmp_path):
    """A removed wheel is found before any step runs: first as a file missing from the manifest, then, with
    the manifest rewritten to match, by pip check on the emulated image, naming what needs it. The summary
    records the error."""
    checkout = copy_checkout(tmp_path / "node")
    shutil.copytree(bundle, checkout / "gpu-bundle", ignore=shutil.ignore_patterns("site-packages"))
    wheel = next((checkout / "gpu-bundle" / "wheels").glob("dpath-*.whl"))
    wheel.unlink()

    done = run_from_bundle(checkout, node_python)
    assert done.returncode == 2
    assert f"gpu-check: {wheel} is listed in {checkout}/gpu-bundle/manifest.json but missing" in done.stderr

    manifest_path = checkout / "gpu-bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"][f"wheels/{wheel.name}"]
    manifest_path.write_text(json.dumps(manifest))
    done = run_from_bundle(checkout, node_python)
    assert done.returncode == 2
    assert "is incomplete for this Python (3.12" in done.stderr
    assert "snakemake 9.27.1 requires dpath, which is not installed" in done.stderr
    summary = json.loads((checkout / "results" / "performance" / "gpu-check.json").read_text())
    assert "requires dpath" in summary["bundle_error"] and summary["steps"] == []


def test_the_complete_bundle_installs_on_the_node_image_and_runs_a_step(bundle, node_python, tmp_path):
    """The same bundle, whole: installed without an index, snakemake starts, and the `gpu` tests run from
    it (skipped: no CUDA here), with each step's record written."""
    checkout = copy_checkout(tmp_path / "node")
    shutil.copytree(bundle, checkout / "gpu-bundle", ignore=shutil.ignore_patterns("site-packages"))
    done = run_from_bundle(checkout, node_python)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((checkout / "results" / "performance" / "gpu-check" / "tests.json").read_text())
    assert record["status"] == "passed" and "0 failed" in record["figures"]
    summary = json.loads((checkout / "results" / "performance" / "gpu-check.json").read_text())
    assert summary["finished"] and summary["python"].startswith("3.12") and summary["bundle"]["install_seconds"] > 0


def test_a_step_past_its_cap_is_stopped_with_its_children_and_recorded(tmp_path, monkeypatch):
    """The cap stops the step's whole process group (a DAG's jobs too), even processes that ignore SIGTERM
    (SIGKILL after the grace period), and says so in the record."""
    from ssl_pipeline.tools import gpu_check

    monkeypatch.setattr(gpu_check, "STOP_GRACE_SECONDS", 1)
    child = tmp_path / "child.pid"
    command = ["/bin/sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {child}; wait"]
    # A cap of 3 s: time for the shell to start its child and write its pid even on a loaded machine.
    record = gpu_check.run_step("speed", command, tmp_path, tmp_path / "speed.log", timeout=3,
                                environment=dict(os.environ))
    assert record["status"] == "timed out after its cap of 3 s" and record["cap_seconds"] == 3
    assert record["seconds"] < 30
    status = Path(f"/proc/{int(child.read_text())}/status")
    try:
        state = status.read_text()
    except FileNotFoundError:
        state = "gone"
    assert state == "gone" or "zombie" in state.lower()


def test_a_step_whose_minimum_does_not_fit_the_budget_is_skipped_with_the_reason(tmp_path):
    checkout = copy_checkout(tmp_path / "node")
    done = subprocess.run([sys.executable, "-m", "ssl_pipeline.tools.gpu_check", "--device", "cpu", "--budget", "20",
                           "--steps", "smoke_dag", "tests"], cwd=checkout, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(checkout)})
    assert done.returncode == 1
    summary = json.loads((checkout / "results" / "performance" / "gpu-check.json").read_text())
    assert summary["finished"] and summary["steps"] == []
    assert [entry["step"] for entry in summary["skipped"]] == ["smoke_dag", "tests"]
    assert re.fullmatch(r"needs at least 60 s, (1\d|20) s of the budget left", summary["skipped"][0]["reason"])
    assert "| smoke_dag | 0 | skipped: needs at least 60 s" in done.stdout
