"""Pretraining on two Slurm nodes against two processes on one node (`make bench-nodes`):

    python -m ssl_pipeline.tools.nodes_benchmark [--experiment config/experiments/smoke.yaml]
                                                 [--out results/performance/nodes.json]

Needs a Slurm cluster of at least two nodes (`sudo .ci/start-slurm --nodes 2` gives one on this
machine). In a copy of this checkout it prepares the experiment's data locally, then runs its
pretraining job three times through profiles/slurm, each time from scratch: 2 nodes x 1 process
(config compute.nodes: 2), 1 node x 2 processes (pretrain.processes: 2, torchrun) and, for the cost of
data parallelism itself, 1 node x 1 process. Every run gets one thread per rank. Per run: the job's wall
time as Snakemake's benchmark measures it (launch, start-up, training, writing), the training time of
its curve, and, on two nodes, each rank's start-up and rendezvous time (from srun's start to joining
the process group). On one machine the "nodes" share its cores, so the ratio measures the overhead of
going through srun and a TCP rendezvous, not a speed-up.
"""
import argparse
import csv
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "envs", "profiles", "ssl_pipeline"]
ENCODER = "results/pretrain/simclr/base/seed0/encoder.pt"
SLURM = ["--workflow-profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "1", "--retries", "0"]
LAYOUTS = {  # name: (config override, threads of the job)
    "2 nodes x 1 process": ({"compute": {"nodes": 2}}, 1),
    "1 node x 2 processes": ({"pretrain": {"processes": 2}}, 2),
    "1 node x 1 process": ({"pretrain": {"processes": 1}}, 1),
}
JOINED = re.compile(r"joined the process group .*, ([\d.]+) s after srun started")


def snakemake(workdir: Path, *arguments) -> None:
    done = subprocess.run([sys.executable, "-m", "snakemake", *arguments], cwd=workdir, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"nodes_benchmark: snakemake {' '.join(arguments)} failed in {workdir}:\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(workdir: Path, experiment: str, name: str) -> dict:
    override, threads = LAYOUTS[name]
    (workdir / "layout.yaml").write_text(yaml.safe_dump(override))
    config = ["--configfile", experiment, "layout.yaml"]
    started = time.perf_counter()
    snakemake(workdir, ENCODER, *SLURM, "--set-threads", f"pretrain={threads}", "--forcerun", "pretrain", *config)
    seconds = time.perf_counter() - started
    run = Path("results/pretrain/simclr/base/seed0")
    benchmark = next(csv.DictReader((workdir / "results/benchmarks/pretrain/simclr/base/seed0.tsv").open(),
                                    delimiter="\t"))
    curve = list(csv.DictReader((workdir / run / "curve.csv").open()))
    rank_logs = sorted((workdir / "results/logs/pretrain/simclr/base/seed0").glob("rank*.log"))
    rendezvous = {path.stem: float(match[1]) for path in rank_logs
                  if (match := JOINED.search(path.read_text())) and name.startswith("2 nodes")}
    for path in rank_logs:
        path.unlink()  # the next layout writes its own
    return {"layout": name, "job_seconds": round(float(benchmark["s"]), 1),
            "training_seconds": float(curve[-1]["elapsed_seconds"]), "final_loss": float(curve[-1]["loss"]),
            "snakemake_seconds": round(seconds, 1), "rendezvous_seconds": rendezvous}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="config/experiments/smoke.yaml")
    parser.add_argument("--out", default="results/performance/nodes.json")
    args = parser.parse_args(argv)
    nodes = subprocess.run(["sinfo", "-N", "--noheader", "--format=%N"], capture_output=True, text=True)
    if nodes.returncode or len(set(nodes.stdout.split())) < 2:
        raise SystemExit("nodes_benchmark: needs a Slurm cluster of at least 2 nodes (sudo .ci/start-slurm --nodes 2)")
    with tempfile.TemporaryDirectory(prefix="nodes-benchmark-") as scratch:
        workdir = Path(scratch) / "workflow"
        workdir.mkdir()
        for part in WORKFLOW_PARTS:
            source = REPO / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, workdir / part)
        snakemake(workdir, "--cores", "2", "--configfile", args.experiment, "--", "results/data/card.json")
        runs = [measure(workdir, args.experiment, name) for name in LAYOUTS]
    two_nodes, one_node = runs[0], runs[1]
    result = {
        "command": "python -m ssl_pipeline.tools.nodes_benchmark " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {len(set(nodes.stdout.split()))} Slurm nodes",
        "experiment": args.experiment, "runs": runs,
        "job_ratio_2_nodes_to_1_node_2_processes": round(two_nodes["job_seconds"] / one_node["job_seconds"], 3),
        "training_ratio_2_nodes_to_1_node_2_processes":
            round(two_nodes["training_seconds"] / one_node["training_seconds"], 3),
        "same_final_loss_2_nodes_and_1_node_2_processes": two_nodes["final_loss"] == one_node["final_loss"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"{run['layout']:22s} job {run['job_seconds']:6.1f} s  training {run['training_seconds']:6.1f} s  "
              f"loss {run['final_loss']}  rendezvous {run['rendezvous_seconds'] or '-'}")
    print(f"2 nodes / 1 node x 2: job {result['job_ratio_2_nodes_to_1_node_2_processes']}, training "
          f"{result['training_ratio_2_nodes_to_1_node_2_processes']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
