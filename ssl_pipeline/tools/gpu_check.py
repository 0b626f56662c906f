"""`make gpu-check` / `gpu-bundle/run`: one command that proves the CUDA path on a machine with an NVIDIA GPU.

    python -m ssl_pipeline.tools.gpu_check [--bundle gpu-bundle] [--budget 480] [--steps ...] [--device cuda]

Made for an offline GPU node (docs/performance-gpu.md, "On an offline GPU node"): a preinstalled PyTorch, no package index,
no dataset host, no git, no make, and about 8 minutes. With --bundle (what `make gpu-bundle` writes), the
bundle's manifest is checked, its wheels are installed without an index into <bundle>/site-packages (on
PYTHONPATH for every step, so the node's own packages stay visible), and its data/ is the only mirror.
The steps run in priority order, figures first, so that a slow step cannot cost them:
1. time_to_accuracy: supervised training from scratch until test accuracy reaches 0.92;
2. speed: the speed benchmark on the device: ours eager and compiled, the reference with a tuned
   DataLoader, at the config's precision (bf16 on a GPU), with views/s, TFLOP/s and the measured roof;
3. smoke_dag: the whole smoke DAG with compute.device set, in a copy of this checkout under
   results/gpu-check/ (so that results/ stays as it is);
4. tests: the `gpu` tests (tests/test_gpu.py), which fail rather than skip inside this check on a GPU.
Each step has a cap (a timeout, after which its process group is stopped); a step whose minimum does not
fit the budget left is skipped, with the reason. Each step's record is written to
results/performance/gpu-check/<step>.json the moment it ends, and the summary,
results/performance/gpu-check.json, after every step; all of it is copied to $OUT/performance when OUT is
set. Without a usable CUDA device (and without --device cpu) it stops at once with the reason.
--device cpu --tiny is the rehearsal of this on a CPU machine (`make gpu-rehearsal`).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_pipeline.core.artifacts import file_digest, write_json
from ssl_pipeline.core.runtime import available_cpus

REPO = Path(__file__).resolve().parents[2]
PERFORMANCE = Path("results/performance")
STEP_RECORDS = PERFORMANCE / "gpu-check"
DAG_COPIES = Path("results/gpu-check")
# Not copied into a DAG's checkout: git's and the environments' folders, and what runs produce.
NOT_COPIED = {".git", ".venv", ".snakemake", ".pytest_cache", ".gpu-rehearsal", "results", "gpu-bundle",
              "gpu-bundle.partial", "__pycache__"}
STOP_GRACE_SECONDS = 15
GPU_CHECK_VARIABLE = "SSL_PIPELINE_GPU_CHECK"  # tests/conftest.py: `gpu` tests fail, not skip, without CUDA


@dataclass(frozen=True)
class Step:
    name: str
    cap: int  # seconds: the step's timeout
    minimum: int  # seconds: skipped if less than this is left of the budget


# Caps from ../shared/notes/gpu-node.md's estimates for one H200, with room: they fit 480 s in this order
# only if the early steps finish under their caps, which is what the budget rule is for.
STEPS = (Step("time_to_accuracy", 120, 45), Step("speed", 240, 90), Step("smoke_dag", 180, 60),
         Step("tests", 150, 30))
STEP_NAMES = tuple(step.name for step in STEPS)


class NoCuda(RuntimeError):
    pass


class BundleError(RuntimeError):
    pass


def require_cuda() -> str:
    """The GPU's name, or NoCuda saying why torch sees none."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    driver = "nvidia-smi is on PATH" if shutil.which("nvidia-smi") else "no nvidia-smi on PATH (no NVIDIA driver?)"
    raise NoCuda(
        "make gpu-check needs an NVIDIA GPU that PyTorch can use, and this machine has none: "
        f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda or 'none: a CPU-only build'}; CUDA_VISIBLE_DEVICES="
        f"{'unset' if visible is None else repr(visible)}; {driver}). Run it on a machine with an NVIDIA "
        "GPU and driver; everything else runs on the CPU with `make test` and `make bench`.")


# ---------------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------------

def verify_manifest(bundle: Path) -> dict:
    """Every file of the manifest present with its sha256, and no wheel the manifest does not list."""
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: is {bundle} what `make gpu-bundle` wrote?")
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in {manifest_path} but missing: copy the whole bundle again")
        if file_digest(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 differs from {manifest_path} (a damaged or partial copy)")
    unlisted = sorted(str(path.relative_to(bundle)) for path in (bundle / "wheels").glob("*.whl")
                      if str(path.relative_to(bundle)) not in manifest["files"])
    if unlisted:
        raise BundleError(f"{bundle}: wheels not in its manifest: {', '.join(unlisted)}")
    return manifest


def bundle_packages(manifest: dict) -> set:
    """Normalised distribution names of the bundle's wheels."""
    return {Path(name).name.split("-")[0].lower().replace("_", "-")
            for name in manifest["files"] if name.startswith("wheels/")}


def install_bundle(bundle: Path, python: str) -> Path:
    """The bundle's wheels installed without an index into <bundle>/site-packages (again only if the
    manifest changed), then checked: their requirements all met (pip check, on this interpreter with the
    node's packages) and snakemake started. Returns the folder to put on PYTHONPATH."""
    manifest = verify_manifest(bundle)
    site = bundle / "site-packages"
    stamp = site / ".installed-from"
    digest = file_digest(bundle / "manifest.json")
    if not (stamp.is_file() and stamp.read_text() == digest):
        shutil.rmtree(site, ignore_errors=True)
        wheels = sorted(str(bundle / name) for name in manifest["files"] if name.startswith("wheels/"))
        done = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                               "--disable-pip-version-check", "--target", str(site), *wheels],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BundleError(f"installing {bundle}/wheels with pip failed:\n{done.stderr.strip()}")
        stamp.write_text(digest)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                                              os.environ.get("PYTHONPATH")]))}
    checked = subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True,
                             text=True, env=environment)
    ours = bundle_packages(manifest)
    unmet = [line for line in checked.stdout.splitlines()
             if line.split(" ")[0].lower().replace("_", "-") in ours]
    if unmet:
        raise BundleError(f"{bundle} is incomplete for this Python ({sys.version.split()[0]}): "
                          + "; ".join(unmet) + ". Add the missing packages to requirements-gpu-node.txt "
                          "and run `make gpu-bundle` again")
    started = subprocess.run([python, "-m", "snakemake", "--version"], capture_output=True, text=True,
                             env=environment)
    if started.returncode != 0:
        raise BundleError(f"snakemake from {bundle} does not start:\n{started.stderr.strip()[-2000:]}")
    return site


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------

def copy_checkout(destination: Path) -> Path:
    """This checkout's files, without git's folder, environments or results: git need not exist."""
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(REPO, destination, ignore=lambda directory, names: [n for n in names if n in NOT_COPIED])
    return destination


def node_override(device: str, raw_dir) -> str:
    """The DAG's override: the device, and the carried data (if any) as the only mirror: the node is offline."""
    override = {"compute": {"device": device, "require_gpu": device.startswith("cuda")}}
    if raw_dir:
        override["dataset"] = {"mirrors": [str(raw_dir)]}
    return json.dumps(override) + "\n"


def step_commands(python: str, device: str, tiny: bool, raw_dir) -> dict:
    """step -> (command, working directory, JSON of its figures or None)."""
    cpus = available_cpus()
    workers = sorted({max(1, cpus // 2), cpus})  # the tuned reference: loader workers on half or all CPUs
    common = ["--device", device] + (["--raw-dir", str(raw_dir)] if raw_dir else []) + (["--tiny"] if tiny else [])
    benchmark = [python, "-m", "ssl_pipeline.benchmark"]
    suffix = device.split(":")[0] + ("-tiny" if tiny else "")
    speed_json = PERFORMANCE / f"speed-{suffix}.json"
    accuracy_json = PERFORMANCE / f"time_to_accuracy-{suffix}.json"
    # lightly is not on the node's image and not in the bundle: the peer comparison stays on the CPU tables.
    speed = [*benchmark, "speed", *common, "--no-lightly", "--out", str(speed_json)]
    # --tiny, the rehearsal's: pretraining only, eager only (it proves the step runs from the bundle).
    speed += (["--no-compiled", "--stages", "pretrain"] if tiny
              else ["--repetition-seconds", "2", "--workers", *map(str, workers)])
    return {
        "time_to_accuracy": ([*benchmark, "time-to-accuracy", *common, "--targets", "0.92", "--out",
                              str(accuracy_json)] + ([] if tiny else ["--epochs", "12", "--time-limit", "90"]),
                             REPO, accuracy_json),
        "speed": (speed, REPO, speed_json),
        # One --configfile with every file: a second flag would replace the first.
        "smoke_dag": ([python, "-m", "snakemake", "--cores", str(cpus), "--resources", "gpu=1", "--configfile",
                       "config/experiments/smoke.yaml", "node.yaml"], DAG_COPIES / "smoke", None),
        "tests": ([python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml",
                   str(REPO / STEP_RECORDS / "tests.xml"), "tests/test_gpu.py"], REPO, None),
    }


def signal_group(pgid: int, number) -> None:
    try:
        os.killpg(pgid, number)
    except ProcessLookupError:  # the whole group has already exited
        pass


def wait_group_gone(pgid: int, seconds: float = 5.0) -> None:
    """SIGKILL is delivered asynchronously: a member can still be running for a moment after killpg.
    Wait (bounded) until no member of the group is left but zombies, so the next step starts alone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = False
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we read it
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.05)


def run_step(name: str, command: list, directory: Path, log_path: Path, timeout: float, environment: dict) -> dict:
    """Run one step under its cap; past it, SIGTERM to its process group (Snakemake and the benchmark
    stop cleanly on it), then SIGKILL after a grace period. Whatever ends the step (its end, the cap, an
    interrupt of the check itself), no process of its group outlives it: the next step gets the GPU."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO / directory, stdout=log, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
        status = None
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            returncode, status = process.returncode, f"timed out after its cap of {timeout:.0f} s"
        finally:
            signal_group(process.pid, signal.SIGKILL)  # what is left of the group, if anything
            process.wait()
            wait_group_gone(process.pid)
        if returncode is None:
            returncode = process.returncode
    return {"step": name, "command": " ".join(command), "directory": str(directory), "log": str(log_path),
            "seconds": round(time.perf_counter() - started, 1), "cap_seconds": round(timeout),
            "returncode": returncode,
            "status": status or ("passed" if returncode == 0 else f"failed (exit {returncode})")}


def figures(name: str, figures_path, record: dict) -> str:
    """One line of the step's headline figures."""
    if record["status"] != "passed":
        return f"{record['status'].upper()}; see {record['log']}"
    if name == "speed":
        meta = json.loads(Path(REPO / figures_path).read_text())
        roof = meta["roof"]
        parts = []
        for stage, entry in meta["stages"].items():
            ours = entry["ours"]
            compiled = (f", {entry['ours_compiled']['images_per_second']:,.0f} compiled"
                        if "ours_compiled" in entry else "")
            parts.append(f"{stage}: {ours['images_per_second']:,.0f} images/s eager{compiled}, "
                         f"{entry['speedup']:.1f}× the reference, {ours['tflops']:.3g} TFLOP/s = "
                         f"{100 * ours['fraction_of_conv_roof']:.0f} % of the conv roof")
        return (f"{roof['precision']}; roof {roof['conv_tflops']:.3g} TFLOP/s conv, {roof['matmul_tflops']:.3g} "
                "matmul; " + "; ".join(parts))
    if name == "time_to_accuracy":
        target = json.loads(Path(REPO / figures_path).read_text())["targets"][0]
        return (f"{target['target']} reached in {target['train_seconds']:.1f} s of training" if target["reached"]
                else f"{target['target']} not reached")
    if name == "tests":
        suite = ElementTree.parse(REPO / STEP_RECORDS / "tests.xml").getroot().find("testsuite")
        return (f"{suite.get('tests')} tests: {suite.get('failures')} failed, {suite.get('errors')} errors, "
                f"{suite.get('skipped')} skipped")
    return "passed"


def publish(summary: dict, started_wall: float) -> None:
    """The summary now; then every file under results/performance written during this check, to $OUT."""
    write_json(REPO / PERFORMANCE / "gpu-check.json", summary)
    out = os.environ.get("OUT")
    if not out:
        return
    for path in (REPO / PERFORMANCE).rglob("*"):
        if path.is_file() and path.stat().st_mtime >= started_wall:
            target = Path(out) / "performance" / path.relative_to(REPO / PERFORMANCE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="what `make gpu-bundle` wrote: install its wheels, use its data as the mirror")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default %(default)s)")
    parser.add_argument("--steps", nargs="+", choices=STEP_NAMES, default=list(STEP_NAMES),
                        help="steps to run, always in priority order (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a rehearsal")
    parser.add_argument("--tiny", action="store_true", help="the benchmarks' --tiny sizes (the rehearsal's)")
    args = parser.parse_args(argv)
    clock, started_wall = time.perf_counter(), time.time()
    try:
        gpu = require_cuda() if args.device.startswith("cuda") else f"none: --device {args.device}"
    except NoCuda as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    print(f"gpu-check on {gpu}, budget {args.budget:.0f} s", flush=True)
    python = sys.executable
    path = os.pathsep.join([str(Path(python).parent), os.environ.get("PATH", "")])  # rules call `python`
    environment = {**os.environ, "PATH": path, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.device.startswith("cuda"):
        environment[GPU_CHECK_VARIABLE] = "1"
    summary = {"gpu": gpu, "device": args.device, "tiny": args.tiny, "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": sys.version.split()[0], "budget_seconds": args.budget,
               "finished": False, "steps": [], "skipped": []}
    raw_dir = None
    if args.bundle:
        bundle = args.bundle.resolve()
        try:
            site = install_bundle(bundle, python)
        except BundleError as error:
            print(f"gpu-check: {error}", file=sys.stderr)
            summary["bundle_error"] = str(error)
            publish(summary, started_wall)
            return 2
        environment["PYTHONPATH"] = os.pathsep.join([str(site), environment["PYTHONPATH"]])
        raw_dir = bundle / "data"
        summary["bundle"] = {"path": str(bundle), "install_seconds": round(time.perf_counter() - clock, 1)}
    rows = ["| step | seconds | result |", "|---|---:|---|"]
    commands = step_commands(python, args.device, args.tiny, raw_dir)
    for step in STEPS:
        if step.name not in args.steps:
            continue
        left = args.budget - (time.perf_counter() - clock)
        if left < step.minimum:
            reason = f"needs at least {step.minimum} s, {max(0, left):.0f} s of the budget left"
            summary["skipped"].append({"step": step.name, "reason": reason})
            rows.append(f"| {step.name} | 0 | skipped: {reason} |")
            publish(summary, started_wall)
            continue
        command, directory, figures_path = commands[step.name]
        if step.name.endswith("_dag"):
            copy = copy_checkout(REPO / directory)
            (copy / "node.yaml").write_text(node_override(args.device, raw_dir))
        print(f"gpu-check: {step.name} (cap {min(step.cap, left):.0f} s) ...", flush=True)
        record = run_step(step.name, command, directory, REPO / STEP_RECORDS / f"{step.name}.log",
                          min(step.cap, left), environment)
        try:
            record["figures"] = figures(step.name, figures_path, record)
        except (OSError, KeyError, ValueError, ElementTree.ParseError) as error:  # the record must still be written
            record["figures"] = f"passed, but its figures could not be read: {error!r}"
        write_json(REPO / STEP_RECORDS / f"{step.name}.json", record)
        summary["steps"].append(record)
        rows.append(f"| {step.name} | {record['seconds']:.0f} | {record['figures']} |")
        summary["elapsed_seconds"] = round(time.perf_counter() - clock, 1)
        publish(summary, started_wall)
        print(f"gpu-check: {step.name}: {record['figures']}", flush=True)
    summary.update(finished=True, elapsed_seconds=round(time.perf_counter() - clock, 1))
    publish(summary, started_wall)
    print("\n".join(rows))
    passed = all(record["status"] == "passed" for record in summary["steps"])
    return 0 if passed and not summary["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
