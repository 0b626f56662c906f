"""`make gpu-check`: one command that proves the CUDA path on a machine with an NVIDIA GPU.

    python -m ssl_pipeline.gpu_check [--skip tests ...]

It runs, in this order (figures first, so that a slow step cannot cost them):
1. speed: the speed benchmark on CUDA: ours, ours compiled, and the reference with a tuned DataLoader;
2. time_to_accuracy: supervised training from scratch until test accuracy reaches 0.92;
3. smoke_dag, default_dag: the whole DAG with compute.device cuda (require_gpu), each in a fresh copy of
   this checkout under results/gpu-check/, so that the CPU results in results/ stay as they are;
4. tests: the test suite with CUDA visible (tests that describe a machine without CUDA skip themselves).
Each step's output goes to results/performance/gpu-check/<step>.log, every figure to JSON under
results/performance/, and a summary to results/performance/gpu-check.json; the table is printed. Nothing
is downloaded: the data come from the Debian package's local mirror named in config dataset.mirrors.
Without a usable CUDA device it stops at once with the reason.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from ssl_pipeline.artifacts import write_json
from ssl_pipeline.runtime import available_cpus

REPO = Path(__file__).resolve().parent.parent
PERFORMANCE = Path("results/performance")
STEP_LOGS = PERFORMANCE / "gpu-check"
DAG_COPIES = Path("results/gpu-check")
STEPS = ("speed", "time_to_accuracy", "smoke_dag", "default_dag", "tests")
# CUDA, and only the Debian package's local mirror: the GPU machine has no internet.
CUDA_OVERRIDE = "compute: {device: cuda, require_gpu: true}\ndataset: {mirrors: [/usr/share/datasets/fashion-mnist]}\n"


class NoCuda(RuntimeError):
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


def checkout_copy(destination: Path) -> Path:
    """The files git tracks (as they are in the working tree), copied to a fresh directory."""
    if destination.exists():
        shutil.rmtree(destination)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / "gpu.yaml").write_text(CUDA_OVERRIDE)
    return destination


def step_commands(python: str) -> dict:
    """step -> (command, working directory, JSON of its figures or None)."""
    cpus = available_cpus()
    workers = sorted({max(1, cpus // 2), cpus})  # the tuned reference: loader workers on half or all CPUs
    benchmark = [python, "-m", "ssl_pipeline.benchmark"]
    speed_json, accuracy_json = PERFORMANCE / "speed-cuda.json", PERFORMANCE / "time_to_accuracy-cuda.json"
    snakemake = [python, "-m", "snakemake", "--cores", str(cpus), "--resources", "gpu=1"]
    return {
        "speed": ([*benchmark, "speed", "--device", "cuda", "--repetition-seconds", "2", "--workers",
                   *map(str, workers), "--out", str(speed_json)], REPO, speed_json),
        "time_to_accuracy": ([*benchmark, "time-to-accuracy", "--device", "cuda", "--targets", "0.92",
                              "--epochs", "12", "--time-limit", "120", "--out", str(accuracy_json)], REPO,
                             accuracy_json),
        # One --configfile with every file: a second flag would replace the first.
        "smoke_dag": ([*snakemake, "--configfile", "config/experiments/smoke.yaml", "gpu.yaml"],
                      DAG_COPIES / "smoke", None),
        "default_dag": ([*snakemake, "--configfile", "gpu.yaml"], DAG_COPIES / "default", None),
        "tests": ([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
                   str(REPO / STEP_LOGS / "tests.xml")], REPO, None),
    }


def run_step(name: str, command: list, directory: Path, log_path: Path) -> dict:
    if name.endswith("_dag"):
        checkout_copy(REPO / directory)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=REPO / directory, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    return {"step": name, "command": " ".join(command), "directory": str(directory), "log": str(log_path),
            "seconds": round(time.perf_counter() - started, 1), "returncode": returncode}


def figures(name: str, figures_path, record: dict) -> str:
    """One line of the step's headline figures."""
    if record["returncode"] != 0:
        return f"FAILED (exit {record['returncode']}); see {record['log']}"
    if name == "speed":
        stages = json.loads(Path(REPO / figures_path).read_text())["stages"]
        return "; ".join(
            f"{stage}: {entry['ours']['images_per_second']:,.0f} images/s eager, "
            f"{entry['ours_compiled']['images_per_second']:,.0f} compiled, {entry['speedup']:.1f}× the reference, "
            f"{100 * entry['ours']['fraction_of_conv_roof']:.0f} % of the conv roof" for stage, entry in stages.items())
    if name == "time_to_accuracy":
        target = json.loads(Path(REPO / figures_path).read_text())["targets"][0]
        return (f"0.92 reached in {target['train_seconds']:.1f} s of training" if target["reached"]
                else "0.92 not reached")
    if name == "tests":
        suite = ElementTree.parse(REPO / STEP_LOGS / "tests.xml").getroot().find("testsuite")
        return (f"{suite.get('tests')} tests: {suite.get('failures')} failed, {suite.get('errors')} errors, "
                f"{suite.get('skipped')} skipped")
    return "passed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="steps to leave out")
    args = parser.parse_args(argv)
    try:
        gpu = require_cuda()
    except NoCuda as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    print(f"gpu-check on {gpu}", flush=True)
    records, rows = [], ["| step | seconds | result |", "|---|---:|---|"]
    for name, (command, directory, figures_path) in step_commands(sys.executable).items():
        if name in args.skip:
            continue
        print(f"gpu-check: {name} ...", flush=True)
        record = run_step(name, command, directory, REPO / STEP_LOGS / f"{name}.log")
        record["figures"] = figures(name, figures_path, record)
        records.append(record)
        rows.append(f"| {name} | {record['seconds']:.0f} | {record['figures']} |")
    write_json(REPO / PERFORMANCE / "gpu-check.json",
               {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "steps": records})
    print("\n".join(rows))
    return 0 if all(record["returncode"] == 0 for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
