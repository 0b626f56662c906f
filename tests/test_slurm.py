"""The workflow on a real Slurm cluster through profiles/slurm, and the profiles themselves.

The cluster is two nodes on this machine, n1 and n2, each with a pretend GPU (.ci/start-slurm --nodes 2):
a job asking for a GPU is scheduled on one and sees CUDA_VISIBLE_DEVICES, but torch finds no CUDA
device behind it, so training falls back to the CPU and its numbers must equal those of a local run.
Pretraining runs on both nodes (config compute.nodes: 2), one srun task per rank
(ssl_pipeline/core/multinode.py); the other stages run on one node each.
"""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.profiles import ProfileConfigFileParser

from tests.conftest import REPO, SMOKE, copy_workflow, require, snakemake, tool_env, write_synthetic_idx

pytestmark = pytest.mark.workflow

# Threads per job: the local reference run has --cores 2, and the test node may have only 2 CPUs.
# Status checks every second instead of the plugin's cluster-friendly 40 s.
SLURM = ("--workflow-profile", "profiles/slurm", "--max-threads", "2",
         "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
LOCAL_RULES = {"download", "report"}
CLUSTER_RULES = {"preprocess", "label_subset", "pretrain", "finetune", "evaluate", "knn_probe", "linear_probe"}


# ---------------------------------------------------------------------------------------------------
# The profiles, as Snakemake reads them
# ---------------------------------------------------------------------------------------------------

def read_profile(name, monkeypatch, **environment):
    for variable in ("CUDA_VISIBLE_DEVICES", "SBATCH_PARTITION", "SBATCH_ACCOUNT"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with open(REPO / "profiles" / name / "config.yaml") as handle:
        return dict(ProfileConfigFileParser().parse(handle))


@pytest.mark.parametrize("visible, cap", [("0", ["gpu=1"]), ("0,1,2", ["gpu=3"]), ("1,-1,2", ["gpu=1"]),
                                          ("", None)])
def test_the_default_profile_caps_gpu_jobs_at_the_visible_gpus(monkeypatch, visible, cap):
    profile = read_profile("default", monkeypatch, CUDA_VISIBLE_DEVICES=visible)
    assert profile.get("resources") == cap
    assert profile["cores"] == "all"


def test_the_slurm_profile_takes_partition_and_account_from_slurms_variables(monkeypatch):
    bare = read_profile("slurm", monkeypatch)
    assert bare["executor"] == "slurm" and bare["slurm-status-command"] == "squeue"
    assert bare["default-resources"] == ["runtime=30", "mem_mb=2048"]
    # pretraining's GPU is its rule's (one node) or a gres per node (compute.nodes > 1); fine-tuning's is set here
    assert "finetune:gpu=1" in bare["set-resources"] and not any(
        resource.startswith("pretrain:gpu") for resource in bare["set-resources"])
    assert "pretrain:mem_mb=4096 * attempt" in bare["set-resources"]
    site = read_profile("slurm", monkeypatch, SBATCH_PARTITION="gpu", SBATCH_ACCOUNT="lab42")
    assert {"slurm_partition='gpu'", "slurm_account='lab42'"} <= set(site["default-resources"])


# ---------------------------------------------------------------------------------------------------
# The real cluster
# ---------------------------------------------------------------------------------------------------

def cluster_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    nodes = subprocess.run(["sinfo", "--noheader", "--states=idle,mixed,allocated", "--format=%n"],
                           capture_output=True, text=True)
    return nodes.returncode == 0 and bool(nodes.stdout.strip())


def cluster_nodes() -> list:
    listed = subprocess.run(["sinfo", "-N", "--noheader", "--states=idle,mixed,allocated", "--format=%N"],
                            capture_output=True, text=True)
    return sorted(set(listed.stdout.split())) if listed.returncode == 0 else []


@pytest.fixture(scope="module")
def slurm_cluster():
    require(cluster_answers(), "no Slurm cluster answers (sinfo): install slurm-wlm and munge, run .ci/start-slurm")


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    require(len(cluster_nodes()) >= 2, "the Slurm cluster has fewer than two nodes: run .ci/start-slurm --nodes 2")


# Pretraining on both nodes, one process each. Each rank gets one thread (its share of the job's
# threads), as each of a local two-process run's ranks does: the CPU's reductions, and so the weights
# bit for bit, depend on the threads per rank.
TWO_NODES = {"compute": {"nodes": 2}}
ONE_THREAD_PER_RANK = ("--set-threads", "pretrain=1")
LOCAL_TWO_PROCESSES = {"pretrain": {"processes": 2}}


def submissions(output: str) -> list:
    """(Snakemake job id, Slurm job id, rule, Slurm log) of every job Snakemake submitted."""
    return [(int(job), slurm_id, re.search(r"/rule_(\w+)/", log).group(1), Path(log))
            for job, slurm_id, log in SUBMITTED.findall(output)]


def slurm_job(slurm_id: str) -> str:
    """What slurmctld knows of a job (it forgets finished ones after MinJobAge, 300 s by default)."""
    return subprocess.run(["scontrol", "--oneliner", "show", "job", slurm_id], capture_output=True,
                          text=True, check=True).stdout


def rules_started(output: str, kind: str) -> list:
    """Rules of the jobs Snakemake started as `kind` ('rule': cluster jobs, 'localrule': here)."""
    return re.findall(rf"^{kind} (\w+):$", output, re.M)


def assert_same_weights(ours: Path, theirs: Path, weights: str, what: str) -> None:
    ours, theirs = (torch.load(path, weights_only=True)[weights] for path in (ours, theirs))
    assert ours.keys() == theirs.keys(), what
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{what}: {key}")


def loss_columns(curve: Path) -> list:
    """The loss curve without its timings."""
    return [(row["epoch"], row["loss"], row["embedding_std"], row["learning_rate"])
            for row in csv.DictReader(curve.open())]


def test_smoke_dag_on_slurm_pretrains_on_two_nodes_as_two_local_processes_would(two_nodes, real_smoke_run, tmp_path):
    """The whole smoke DAG through the profile with compute.nodes: 2. Pretraining is one job on n1 and
    n2, one rank each; its encoder equals, tensor for tensor, that of a local run with 2 processes on
    one node (same global batch and seed), and so does its loss curve. Every other stage is a one-node
    job; those that do not read the encoder (preprocessing, label subsets, training from scratch)
    give what the local run gave, byte for byte. Over 60 s (210 s in the clean-clone CI run, 2-core AMD EPYC,
    2026-12-02): 14 Slurm jobs,
    each a Snakemake job that imports torch on its node, and the local 2-process reference run."""
    local, local_seconds = real_smoke_run
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "nodes.yaml").write_text(yaml.safe_dump(TWO_NODES))
    started = time.perf_counter()
    result = snakemake(workdir, *SLURM, *ONE_THREAD_PER_RANK, *SMOKE, "nodes.yaml")
    print(f"smoke DAG: local {local_seconds:.1f} s, Slurm with 2-node pretraining {time.perf_counter() - started:.1f} s")
    output = result.stdout + result.stderr

    # Every non-local rule ran as a Slurm job, with its job id in Snakemake's log and a Slurm log.
    jobs = submissions(output)
    assert sorted(rule for _, _, rule, _ in jobs) == sorted(rules_started(output, "rule"))
    assert {rule for _, _, rule, _ in jobs} == CLUSTER_RULES
    assert len(jobs) == 14  # preprocess, 2 label subsets, pretrain, 4 finetune, 4 evaluate, kNN and linear probe
    assert set(rules_started(output, "localrule")) == LOCAL_RULES | {"all"}
    (log_file,) = (workdir / ".snakemake" / "log").glob("*.snakemake.log")
    assert submissions(log_file.read_text()) == jobs
    for _, slurm_id, rule, slurm_log in jobs:
        assert f"rule_{rule}" in slurm_log.parts and slurm_log.name == f"{slurm_id}.log"
        assert "Finished jobid" in slurm_log.read_text(), slurm_log  # Snakemake ran the job on the node
        job = slurm_job(slurm_id)
        if rule == "pretrain":  # both nodes, a task each, the pretend GPU as a gres per node
            assert "NumNodes=2 " in job and "NumTasks=2 " in job and "NodeList=n[1-2]" in job, job
            assert "TresPerNode=gres:gpu:1" in job, job
        else:
            assert "NumNodes=1 " in job, job

    # One log per rank, named by rank and node; rank 0's summary in the rule's log. The training jobs
    # were given a GPU, found no CUDA behind it and said so; the other jobs were given none.
    logs = workdir / "results" / "logs"
    pretrain_log = logs / "pretrain" / "simclr" / "base" / "seed0.log"
    rank_logs = sorted(path.name for path in (logs / "pretrain" / "simclr" / "base" / "seed0").iterdir())
    assert rank_logs == ["rank0-n1.log", "rank1-n2.log"]
    for rank, node in ((0, "n1"), (1, "n2")):
        text = (logs / "pretrain" / "simclr" / "base" / "seed0" / f"rank{rank}-{node}.log").read_text()
        assert f"rank {rank} of 2 joined the process group (gloo) on cpu, node {node}" in text
        assert "s after srun started (start-up and rendezvous)" in text
    summary = pretrain_log.read_text()
    assert "starting 2 data-parallel processes on 2 nodes (1 per node)" in summary
    assert "in 2 data-parallel process(es) on n1, n2" in summary and "epoch 1 loss" in summary
    assert "rank 1 of 2 joined" not in summary  # the other ranks' info stays in their own logs
    for log in [pretrain_log, *sorted((logs / "finetune").rglob("*.log"))]:
        assert "CUDA_VISIBLE_DEVICES='0' but torch finds no usable CUDA device; falling back to the CPU" \
            in log.read_text(), log
    for log in [*sorted((logs / "knn_probe").rglob("*.log")), *sorted((logs / "linear_probe").rglob("*.log")),
                *sorted((logs / "evaluate").rglob("*.log"))]:
        assert "CUDA_VISIBLE_DEVICES" not in log.read_text(), log

    # The encoder and its loss curve: those of 2 local processes on one node (pretraining alone, about 30 s).
    reference = copy_workflow(tmp_path / "reference")
    (reference / "processes.yaml").write_text(yaml.safe_dump(LOCAL_TWO_PROCESSES))
    snakemake(reference, ENCODER, "--cores", "2", *SMOKE, "processes.yaml")
    results = workdir / "results"
    assert_same_weights(workdir / ENCODER, reference / ENCODER, "encoder", ENCODER)
    curve = "results/pretrain/simclr/base/seed0/curve.csv"
    assert loss_columns(workdir / curve) == loss_columns(reference / curve)
    card = torch.load(workdir / ENCODER, weights_only=True)["encoder_card"]
    assert card["world"] == {"world_size": 2, "nodes": ["n1", "n2"], "rank_nodes": ["n1", "n2"]}
    report = (results / "report.md").read_text()
    assert "Pretraining ran data-parallel as follows: simclr: 2 process(es) on 2 node(s) (n1, n2)." in report

    # The stages that do not read the encoder are unchanged: the same files as the local one-node run's.
    subsets = sorted((local / "results" / "data" / "subsets").rglob("*.npy"))
    assert len(subsets) == 2
    for relative in ["data/train_images.npy", "data/test_labels.npy",
                     *[path.relative_to(local / "results").as_posix() for path in subsets]]:
        assert (results / relative).read_bytes() == (local / "results" / relative).read_bytes(), relative
    scratch = sorted((local / "results").glob("evaluate/scratch/**/*.json"))
    assert scratch
    for metrics in scratch:
        relative = metrics.relative_to(local / "results")
        assert json.loads((results / relative).read_text()) == json.loads(metrics.read_text()), relative
    for model in sorted((local / "results").glob("finetune/scratch/**/model.pt")):
        relative = model.relative_to(local / "results")
        assert_same_weights(results / relative, model, "model", relative.as_posix())


# ---------------------------------------------------------------------------------------------------
# Failures: a retried job, a cancelled job
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def synthetic_workflow(tmp_path):
    """A copy of the workflow with profiles, configured for a tiny synthetic dataset in a local mirror;
    returns (workdir, config arguments)."""
    workdir = copy_workflow(tmp_path / "workflow")
    files = write_synthetic_idx(tmp_path / "mirror", num_classes=3, size=12, train_per_class=40)
    override = {
        "dataset": {"name": "synthetic", "mirrors": [str(tmp_path / "mirror")], "files": files,
                    "class_names": []},
        "data": {"validation_fraction": 0.25},
        "finetune": {"label_fractions": [1.0], "seeds": [0], "inits": ["pretrained"], "min_steps": 5},
    }
    (workdir / "synthetic.yaml").write_text(yaml.safe_dump(override))
    return workdir, ("--configfile", "config/experiments/smoke.yaml", "synthetic.yaml")


ENCODER = "results/pretrain/simclr/base/seed0/encoder.pt"


def running_job_of_rule(rule: str, workdir: Path, timeout: float = 240) -> str:
    """The Slurm id of the first running job of `rule` (the plugin puts the rule in the job's comment:
    rule_<rule>, or rule_<rule>_wildcards_<values>) submitted from `workdir`, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i|%k|%Z"],
                               capture_output=True, text=True, check=True).stdout
        for line in queue.splitlines():
            slurm_id, comment, job_workdir = line.split("|", 2)
            if comment.split("_wildcards_")[0] == f"rule_{rule}" and Path(job_workdir) == workdir:
                return slurm_id
        time.sleep(0.5)
    raise AssertionError(f"no job of rule {rule} ran within {timeout} s")


def wait_for_line(path: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path} did not say {text!r} within {timeout} s"
        time.sleep(0.2)


def assert_same_encoder(workdir: Path, reference: Path) -> None:
    ours, theirs = (torch.load(root / ENCODER, weights_only=True)["encoder"] for root in (workdir, reference))
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def rank_pid(rank_log: Path) -> int:
    """The pid a rank's log gives when it joins the process group."""
    return int(re.search(r"joined the process group .* \(pid (\d+)\)", rank_log.read_text())[1])


def log_time(line: str) -> float:
    """The time of a log line, '2026-12-01 22:31:39,481 ERROR ...' -> seconds since the epoch."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_two_node_job_cancelled_or_losing_a_rank_resumes_and_a_failed_job_is_retried(
        two_nodes, synthetic_workflow, tmp_path):
    """Pretraining on 2 nodes, three times: scancel stops both ranks at one step with the state written
    once; a SIGKILL of one rank's process fails the job within config compute.rank_timeout_seconds, the
    log naming the rank and its node; then the rerun fails once (injected) and is retried with more
    resources, and the retry resumes to the weights of an uninterrupted run (2 local processes). One
    workflow for all, since every Slurm run here costs tens of seconds (201 s in the clean-clone CI run, 2-core
    AMD EPYC, 2026-12-02; 300 steps)."""
    workdir, config = synthetic_workflow
    # Long enough to interrupt it while it trains; no resume state but the one SIGTERM makes it write.
    slow = {"pretrain": {"epochs": 300}, "compute": {"checkpoint_every": 60, "rank_timeout_seconds": 30}}
    (workdir / "slow.yaml").write_text(yaml.safe_dump({**slow, "compute": {**slow["compute"], **TWO_NODES["compute"]}}))
    arguments = (ENCODER, *SLURM, *ONE_THREAD_PER_RANK, *config, "slow.yaml")
    reference = copy_workflow(tmp_path / "reference")
    (reference / "synthetic.yaml").write_text((workdir / "synthetic.yaml").read_text())
    (reference / "slow.yaml").write_text(yaml.safe_dump({**slow, "pretrain": {**slow["pretrain"], **LOCAL_TWO_PROCESSES["pretrain"]}}))
    snakemake(reference, ENCODER, "--cores", "2", *config, "slow.yaml")
    log = workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log"
    rank_logs = log.with_suffix("")

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "snakemake", *arguments, *extra], cwd=workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env())

    # ---- scancel: every rank writes its part of the state at the same step, and Snakemake says why ------
    # No retries here, or Snakemake would submit the cancelled job again.
    run = start("--retries", "0")
    try:
        cancelled = running_job_of_rule("pretrain", workdir)
        wait_for_line(log, "pretraining simclr on")
        subprocess.run(["scancel", cancelled], check=True)  # SIGTERM to the job's processes, then SIGKILL
        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert "Error in rule pretrain" in output
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in output
    stop = re.search(r"pretrain simclr stopped by SIGTERM at epoch (\d+), step 1 of 1; its state is in "
                     r"results/resume/pretrain/simclr/base/seed0.pt: run the same command again to continue$",
                     log.read_text().strip())
    assert stop, log.read_text()[-2000:]
    for rank, node in ((0, "n1"), (1, "n2")):  # both ranks stopped at that step
        assert f"stopped by SIGTERM at epoch {stop[1]}, step 1 of 1" in (rank_logs / f"rank{rank}-{node}.log").read_text()
    assert log.read_text().count("resume state at ") == 1  # written once, by rank 0
    # What the cancelled job had asked Slurm for: 2 nodes, a task and a GPU each, the profile's memory and time.
    job = slurm_job(cancelled)
    assert "NumNodes=2 " in job and "NumTasks=2 " in job and "TresPerNode=gres:gpu:1" in job
    assert "MinMemoryNode=4G" in job and "TimeLimit=02:00:00" in job
    finished = {path: path.stat().st_mtime_ns for path in (workdir / "results" / "data").iterdir()}
    assert finished and not (workdir / ENCODER).exists()
    state = workdir / "results" / "resume" / "pretrain" / "simclr" / "base" / "seed0.pt"
    saved = state.read_bytes()

    # ---- SIGKILL of rank 1's process: the job fails well within the rank timeout, naming rank and node ---
    shutil.rmtree(rank_logs)
    run = start("--retries", "0")
    try:
        wait_for_line(rank_logs / "rank1-n2.log", "resuming from")
        killed_at = time.time()
        os.kill(rank_pid(rank_logs / "rank1-n2.log"), signal.SIGKILL)
        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    last = log.read_text().strip().splitlines()[-1]
    assert "ERROR ssl_pipeline: pretraining on 2 nodes failed: rank 1 on node n2 was lost " \
           "(Killed)" in last, log.read_text()[-3000:]
    assert "srun: error: n2: task 1: Killed" in log.read_text()
    print(f"a rank killed: the job's last line {log_time(last) - killed_at:.1f} s later")
    assert log_time(last) - killed_at < slow["compute"]["rank_timeout_seconds"]
    assert state.read_bytes() == saved  # no state written by half a world

    # ---- the rerun: only the missing job runs; failing once, it is retried with more resources ------
    marker = tmp_path / "pretrain-failed-once"
    rerun = snakemake(workdir, *arguments, env={"SSL_PIPELINE_FAIL_ONCE": str(marker)})
    output = rerun.stdout + rerun.stderr
    assert (workdir / ENCODER).exists() and marker.exists()
    jobs = submissions(output)
    assert [rule for _, _, rule, _ in jobs] == ["pretrain", "pretrain"], output
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # preprocess did not rerun
    first, second = (slurm_job(slurm_id) for _, slurm_id, _, _ in jobs)
    assert "JobState=FAILED" in first and "JobState=COMPLETED" in second
    assert f"SLURM-job '{jobs[0][1]}' failed, SLURM status is: 'FAILED'" in output
    assert "failure injected by the test switch" in output  # the failed attempt's log, as Snakemake shows it
    # The profile's resources grow with the attempt: 4 GB and 2 h, then twice that; both nodes each time.
    assert "MinMemoryNode=4G" in first and "TimeLimit=02:00:00" in first
    assert "MinMemoryNode=8G" in second and "TimeLimit=04:00:00" in second
    assert "NumNodes=2 " in first and "NumNodes=2 " in second
    assert "the injected failure already happened" in log.read_text()
    # The successful attempt continued where the cancelled job stopped, to an uninterrupted run's weights.
    assert f"resuming from results/resume/pretrain/simclr/base/seed0.pt after epoch {stop[1]}, step 1 of 1" in log.read_text()
    assert_same_encoder(workdir, reference)


# ---------------------------------------------------------------------------------------------------
# Resumable training: a job at its time limit stops itself, and its retry resumes
# ---------------------------------------------------------------------------------------------------

def test_a_two_node_job_near_its_time_limit_stops_both_ranks_and_its_retry_resumes_to_the_same_weights(
        two_nodes, tmp_path):
    """Pretraining on 2 nodes. One minute for the first attempt, two for the second, three for the
    third (the profile's `runtime: N * attempt`). Both ranks stop at the same step, 50 s before the
    limit that Slurm reports for the job, with the state written; the retry continues from it. The
    weights equal those of an uninterrupted local run with 2 processes. The second attempt normally
    finishes; on a busy machine the third may be needed. Over 60 s (107 s in the clean-clone CI run, 2-core AMD
    EPYC, 2026-12-02): the first
    attempt's one-minute limit is the test, then the retry, and the local reference run."""
    workdir = copy_workflow(tmp_path / "workflow")
    files = write_synthetic_idx(tmp_path / "mirror", num_classes=3, size=28, train_per_class=1000)
    override = {
        "dataset": {"name": "synthetic", "mirrors": [str(tmp_path / "mirror")], "files": files, "class_names": []},
        "data": {"validation_fraction": 0.25},
        "pretrain": {"epochs": 30},  # 240 steps: about 15 s on this 2-core machine, 10 s in the first attempt
        "compute": {"stop_margin_seconds": 50},
    }
    (workdir / "timed.yaml").write_text(yaml.safe_dump({**override, "compute": {"stop_margin_seconds": 50, "nodes": 2}}))
    config = (*SMOKE, "timed.yaml")
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    profile.write_text(profile.read_text().replace("runtime: 120 * attempt", "runtime: 1 * attempt"))
    reference = copy_workflow(tmp_path / "reference")
    (reference / "timed.yaml").write_text(yaml.safe_dump({**override, "pretrain": {"epochs": 30, "processes": 2}}))
    snakemake(reference, ENCODER, "--cores", "2", *config)

    started = time.perf_counter()
    result = snakemake(workdir, ENCODER, *SLURM, *ONE_THREAD_PER_RANK, *config)
    print(f"pretraining stopped at its time limit, retried and resumed: {time.perf_counter() - started:.0f} s "
          "for the whole run")
    output = result.stdout + result.stderr
    attempts = [slurm_job(slurm_id) for _, slurm_id, rule, _ in submissions(output) if rule == "pretrain"]
    assert len(attempts) in (2, 3), output
    # Each attempt but the last ended itself (FAILED, not TIMEOUT) and said why; each retry had more time.
    for number, attempt in enumerate(attempts, start=1):
        assert f"TimeLimit=00:0{number}:00" in attempt
        assert ("JobState=COMPLETED" if number == len(attempts) else "JobState=FAILED") in attempt
    stops = re.findall(r"pretrain simclr stopped at epoch (\d+), step (\d+) of 8, 50 s before its Slurm job's time "
                       "limit", output)
    # The failed attempts' logs, as Snakemake shows them: in each, rank 0, rank 1 and the launcher name one step.
    assert len(stops) == 3 * (len(attempts) - 1), output
    for attempt in range(len(attempts) - 1):
        assert len(set(stops[3 * attempt:3 * attempt + 3])) == 1, stops
    log = (workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log").read_text()
    epoch, step = stops[-1]
    assert f"resuming from results/resume/pretrain/simclr/base/seed0.pt after epoch {epoch}, step {step} of 8" in log
    assert not (workdir / "results" / "resume" / "pretrain" / "simclr" / "base" / "seed0.pt").exists()
    assert_same_encoder(workdir, reference)


# ---------------------------------------------------------------------------------------------------
# The cluster script
# ---------------------------------------------------------------------------------------------------

def start_slurm(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / ".ci" / "start-slurm"), *arguments], capture_output=True,
                          text=True, timeout=120)


def test_start_slurm_brings_up_two_nodes_on_this_machine_and_one_again(slurm_cluster):
    """`.ci/start-slurm --nodes 2`: two slurmd, n1 and n2, on this host, each running one task of a
    two-node step; the host's names resolve on the machine itself (IPv4, IPv6 and the IPv4-mapped
    address c10d asks for). Then one node, and then the cluster the other tests found comes back. Last
    in this file: it restarts the cluster."""
    require(Path("/etc/slurm").exists() and os.geteuid() == 0, "the cluster script needs root")
    before = len(cluster_nodes())
    try:
        started = start_slurm("--nodes", "2")
        assert started.returncode == 0, started.stdout + started.stderr
        assert cluster_nodes() == ["n1", "n2"]
        step = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                               "echo $SLURMD_NODENAME $SLURM_PROCID"], capture_output=True, text=True, timeout=60)
        assert sorted(step.stdout.split("\n")[:2]) == ["n1 0", "n2 1"], step.stdout + step.stderr
        again = start_slurm("--nodes", "2")
        assert "already up" in again.stdout
        host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        hosts = [line.split() for line in Path("/etc/hosts").read_text().splitlines() if line.strip()]
        for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            assert any(fields[0] == address and host in fields[1:] for fields in hosts), address
        bad = start_slurm("--nodes", "two")
        assert bad.returncode == 2 and "--nodes must be a positive whole number, not 'two'" in bad.stderr
        one = start_slurm()
        assert one.returncode == 0, one.stdout + one.stderr
        assert "restarting with 1 node(s) instead of 2" in one.stdout and cluster_nodes() == [host]
    finally:
        restored = start_slurm("--nodes", str(max(1, before)))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert len(cluster_nodes()) == max(1, before)
