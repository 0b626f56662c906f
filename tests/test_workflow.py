"""The whole DAG under real Snakemake: on a synthetic IDX dataset served over loopback HTTP, and on the
real Fashion-MNIST from Debian's package."""
import csv
import re
import json

import pytest
import yaml

from tests.conftest import (DEBIAN_FASHION_MNIST, REPO, SMOKE, copy_workflow, serve_directory, snakemake,
                            write_synthetic_idx)

pytestmark = pytest.mark.workflow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_summary(workdir):
    with open(workdir / "results" / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_complete_report(workdir, expected_runs, fractions, objectives=("simclr",)):
    results = workdir / "results"
    rows = read_summary(workdir)
    assert len(rows) == expected_runs
    assert all(0.0 <= float(row["test_accuracy"]) <= 1.0 for row in rows)
    assert {row["objective"] for row in rows if row["init"] == "pretrained"} == set(objectives)
    report = (results / "report.md").read_text()
    assert "## Label efficiency" in report
    for fraction in fractions:
        assert f"| {100 * fraction:g}% |" in report
    for plot in ("label_efficiency", "training_curves", "confusion_matrix"):
        assert f"plots/{plot}.png" in report
        assert (results / "plots" / f"{plot}.png").read_bytes()[:8] == PNG_MAGIC
    assert "| labels | labeled images | " + " | ".join([*objectives, "scratch"]) + " |" in report
    for objective in objectives:
        knn = json.loads((results / "evaluate" / "knn" / objective / "base" / "seed0.json").read_text())
        linear = json.loads((results / "evaluate" / "linear" / objective / "base" / "seed0.json").read_text())
        assert knn["objective"] == linear["objective"] == objective and linear["converged"]
        assert f"{knn['encoder_accuracy']:.4f}" in report.split(f"| {objective} |")[-1].splitlines()[0]
    assert f"{linear['accuracy']:.4f}" in report.split(f"| {objective} |")[-1].splitlines()[0]
    if knn["raw_pixel_accuracy"] is None:  # config evaluate.knn_raw_pixels: false (the ImageNet experiments)
        assert "| raw pixels |" not in report
    else:
        assert f"| raw pixels | — | — | — | {knn['raw_pixel_accuracy']:.4f} |" in report


def assert_up_to_date_and_reportable(workdir, *config_args):
    dry = snakemake(workdir, "-n", "--cores", "1", *config_args)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    snakemake(workdir, "--cores", "1", *config_args, "--report", "results/report.html")
    html = (workdir / "results" / "report.html").read_text()
    assert "<html" in html.lower() and "label_efficiency.png" in html


def test_lint_passes():
    result = snakemake(REPO, "--lint")
    assert "Congratulations" in result.stdout + result.stderr


def test_a_bad_config_is_reported_before_any_job_runs(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "bad.yaml").write_text("pretrain:\n  epochs: 0\nmodel:\n  widht: [8]\n")
    result = snakemake(workdir, "--cores", "1", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0
    assert "config key pretrain.epochs: 0 is less than the minimum of 1" in result.stderr
    assert "unknown key model.widht" in result.stderr
    assert not (workdir / "results").exists()
    # Several nodes need Slurm: run here, that is an error before any job runs, naming the key.
    (workdir / "nodes.yaml").write_text("compute:\n  nodes: 2\n")
    result = snakemake(workdir, "--cores", "1", "--configfile", "nodes.yaml", check=False)
    assert result.returncode != 0
    assert "config key compute.nodes is 2: pretraining on several nodes runs as a Slurm job through the slurm " \
           "executor (--workflow-profile profiles/slurm), not the local executor" in result.stderr
    assert not (workdir / "results").exists()


def test_a_sweep_over_processes_per_node_gives_each_variants_job_its_own_tasks_and_gpus(tmp_path):
    """compute.nodes: 2 with a sweep over pretrain.processes: each variant's pretraining job asks the slurm
    executor for its own count of tasks, tasks per node and GPUs per node (a dry run, which may plan jobs on
    several nodes: it runs none)."""
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "sweep.yaml").write_text("compute:\n  nodes: 2\nsweeps:\n  procs: {pretrain.processes: [1, 3]}\n")
    plan = snakemake(workdir, "-n", "--cores", "1", *SMOKE, "sweep.yaml").stdout
    jobs = {}
    for block in plan.split("\nrule pretrain:")[1:]:
        variant = re.search(r"variant=([^,\s]+)", block)[1]
        jobs[variant] = dict(re.findall(r"\b(tasks|cpus_per_task|slurm_extra|gres)=([^,\s]+)", block.split("\n\n")[0]))
    assert jobs == {
        "base": {"tasks": "2", "cpus_per_task": "1", "slurm_extra": "--ntasks-per-node=1", "gres": "gpu:1"},
        "processes~1": {"tasks": "2", "cpus_per_task": "1", "slurm_extra": "--ntasks-per-node=1", "gres": "gpu:1"},
        "processes~3": {"tasks": "6", "cpus_per_task": "1", "slurm_extra": "--ntasks-per-node=3", "gres": "gpu:3"},
    }


def planned_outputs(workdir, *args) -> list:
    """The output files of every job a dry run of `snakemake args` would run."""
    plan = snakemake(workdir, "-n", "--cores", "1", *args).stdout
    return [path for line in plan.splitlines() if line.strip().startswith("output:")
            for path in line.split(":", 1)[1].replace(",", " ").split()]


def test_synthetic_idx_dataset_over_loopback_http(tmp_path, http_server):
    """A new IDX dataset by config alone: 3 classes of 12x12 images, fetched from a real HTTP server,
    pretrained with two objectives side by side; adding a third reruns nothing that exists. Over 60 s (77 s
    in the clean-clone CI run, 2-core AMD EPYC, 2026-12-02): about 20 jobs, each importing torch, then a report
    and a dry run; one fine-tuning seed keeps it
    at that."""
    url, routes = http_server
    files = write_synthetic_idx(tmp_path / "served", num_classes=3, size=12, train_per_class=80)
    serve_directory(routes, tmp_path / "served", prefix="/synthetic")
    workdir = copy_workflow(tmp_path / "workflow")
    override = {
        "dataset": {"name": "synthetic", "mirrors": [f"{url}/synthetic"], "files": files, "class_names": []},
        "finetune": {"label_fractions": [0.5, 1.0], "seeds": [0], "min_steps": 10},
        "data": {"validation_fraction": 0.25},
        "pretrain": {"objectives": ["simclr", "byol"]},
    }
    (workdir / "synthetic.yaml").write_text(yaml.safe_dump(override))
    config_args = ("--configfile", "config/experiments/smoke.yaml", "synthetic.yaml")

    plan = snakemake(workdir, "-n", "-p", "--cores", "2", *config_args).stdout
    pretrain_jobs = [job.split("\n\n")[0] for job in plan.split("rule pretrain:")[1:]]
    assert len(pretrain_jobs) == 2
    for job in pretrain_jobs:
        assert "train_images.npy" in job and "labels" not in job

    snakemake(workdir, "--cores", "2", *config_args)
    card = json.loads((workdir / "results" / "data" / "card.json").read_text())
    assert card["image_shape"] == [1, 12, 12] and card["num_classes"] == 3
    assert card["splits"]["train"]["per_class"] == [60, 60, 60]
    assert routes.count(f"/synthetic/{files['train_images']['name']}.gz") == 1
    assert_complete_report(workdir, expected_runs=6, fractions=[0.5, 1.0], objectives=("simclr", "byol"))
    assert_up_to_date_and_reportable(workdir, *config_args)

    # A third objective adds its own jobs and the report; nothing that exists runs again.
    (workdir / "third.yaml").write_text(yaml.safe_dump({"pretrain": {"objectives": ["simclr", "byol", "vicreg"]}}))
    outputs = planned_outputs(workdir, *config_args, "third.yaml")
    assert "results/pretrain/vicreg/base/seed0/encoder.pt" in outputs and "results/report.md" in outputs
    assert [path for path in outputs if "vicreg" not in path and "report" not in path
            and not path.startswith(("results/summary.csv", "results/metrics.json", "results/plots/",
                                     "results/label_efficiency.csv", "results/tables/"))] == []


def test_smoke_experiment_on_real_fashion_mnist(real_smoke_run):
    workdir, seconds = real_smoke_run
    print(f"smoke DAG on real Fashion-MNIST: {seconds:.1f} s")
    card = json.loads((workdir / "results" / "data" / "card.json").read_text())
    assert card["image_shape"] == [1, 28, 28] and card["num_classes"] == 10
    assert [card["splits"][s]["count"] for s in ("train", "val", "test")] == [54000, 6000, 10000]
    log = (workdir / "results" / "logs" / "download.log").read_text()
    assert f"installed results/raw/train-images-idx3-ubyte from {DEBIAN_FASHION_MNIST}" in log
    assert_complete_report(workdir, expected_runs=4, fractions=[0.1, 1.0])
    assert_up_to_date_and_reportable(workdir, *SMOKE)
