"""DVC versions what Snakemake produces: real git, real DVC, real Snakemake, a local remote in a
temporary directory. The smoke experiment's outputs come from the session's real-data smoke run."""
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_pipeline.tools.versioning import VersioningError, check_dvc_yaml, locked_outputs, param_sources
from tests.conftest import REPO, SMOKE, copy_workflow, snakemake, tool_env

pytestmark = pytest.mark.workflow
VERSIONED_PARTS = [".dvc/config", ".dvcignore", ".gitignore"]
IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org"}


def run(*args, cwd, check=True) -> subprocess.CompletedProcess:
    """A command with this interpreter's environment first on PATH (dvc stages call `snakemake`)."""
    result = subprocess.run(list(args), cwd=cwd, env=tool_env(IDENTITY), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args, cwd, check=True):
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def versioning(*args, cwd, check=True):
    return run(sys.executable, "-m", "ssl_pipeline.tools.versioning", *args, cwd=cwd, check=check)


def fingerprints(workdir: Path, paths) -> dict:
    return {path: hashlib.sha256((workdir / path).read_bytes()).hexdigest() for path in paths}


def workspace_state(workdir: Path) -> dict:
    """Every file under results/ with its content hash and mtime."""
    results = workdir / "results"
    return {str(path.relative_to(workdir)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(results.rglob("*")) if path.is_file()} if results.exists() else {}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, real_smoke_run):
    """A git repository of the workflow whose smoke outputs are recorded in dvc.lock and pushed.
    Returns (repository, remote)."""
    smoke_workdir, _ = real_smoke_run
    root = tmp_path_factory.mktemp("dvc")
    repo, remote = copy_workflow(root / "repo"), root / "remote"
    for part in VERSIONED_PARTS:
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / part, repo / part)
    # The smoke run, as Snakemake left it: outputs with their mtimes, and Snakemake's metadata.
    for part in ("results", ".snakemake"):
        shutil.copytree(smoke_workdir / part, repo / part, ignore=shutil.ignore_patterns("locks", "log"))
    run("git", "init", "-q", cwd=repo)
    dvc("remote", "modify", "--local", "store", "url", str(remote), cwd=repo)
    versioning("dvc-yaml", *SMOKE, cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "smoke experiment", cwd=repo)
    versioning("record", cwd=repo)
    run("git", "add", "dvc.lock", cwd=repo)
    run("git", "commit", "-qm", "record the smoke outputs", cwd=repo)
    versioning("push", cwd=repo)
    return repo, remote


def fresh_clone(recorded, destination: Path) -> Path:
    repo, remote = recorded
    run("git", "clone", "-q", str(repo), str(destination), cwd=destination.parent)
    dvc("remote", "modify", "--local", "store", "url", str(remote), cwd=destination)
    return destination


# ---------------------------------------------------------------------------------------------------
# dvc.yaml mirrors the Snakemake DAG
# ---------------------------------------------------------------------------------------------------

def test_committed_dvc_yaml_is_what_the_snakemake_dag_gives():
    check_dvc_yaml(REPO, [])


def test_a_changed_rule_output_makes_the_sync_check_fail(tmp_path):
    scratch = copy_workflow(tmp_path / "scratch")
    shutil.copy2(REPO / "dvc.yaml", scratch / "dvc.yaml")
    check_dvc_yaml(scratch, [])
    # Move the pretraining outputs (the rule's, and where its consumers look for them).
    for rules in (scratch / "workflow" / "rules").glob("*.smk"):
        rules.write_text(rules.read_text().replace("{RESULTS}/pretrain/", "{RESULTS}/pretraining/"))
    with pytest.raises(VersioningError, match="drifted from the Snakemake DAG") as error:
        check_dvc_yaml(scratch, [])
    assert "+    - results/pretraining/simclr/base/seed0/encoder.pt" in str(error.value)
    assert "-    - results/pretrain/simclr/base/seed0/encoder.pt" in str(error.value)


def test_each_objective_gets_stages_that_read_its_own_config_section(tmp_path):
    """With two objectives: a pretraining stage each, tracking its own section of pretrain only, so that
    `dvc exp run -S` on one objective's key reruns that objective's stages alone; fine-tuning from each
    encoder is a stage of its own (a foreach over fractions and seeds), scratch runs exist once, and
    evaluation and the kNN probe cover the objectives in their foreach."""
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "two.yaml").write_text(yaml.safe_dump({"pretrain": {"objectives": ["simclr", "byol"]}}))
    versioning("dvc-yaml", *SMOKE, "--configfile", "two.yaml", cwd=workdir)
    stages = yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"]
    assert {"pretrain_simclr", "pretrain_byol", "knn_probe_simclr", "knn_probe_byol", "linear_probe_simclr",
            "finetune_simclr-base-seed0", "finetune_byol-base-seed0", "finetune_scratch", "evaluate"} <= set(stages)
    for objective, other in (("simclr", "byol"), ("byol", "simclr")):
        keys = [key for source in stages[f"pretrain_{objective}"]["params"] for keys in source.values() for key in keys]
        assert f"pretrain.{objective}.projection_dim" in keys and "pretrain.epochs" in keys
        assert not [key for key in keys if key.startswith(f"pretrain.{other}.")]
    for init in ("simclr/base/seed0", "byol/base/seed0", "scratch"):
        stage = stages[f"finetune_{init.replace('/', '-')}"]["do"]
        assert stage["outs"][0].startswith(f"results/finetune/{init}/")
        assert (f"results/pretrain/{init}/encoder.pt" in stage["deps"]) == (init != "scratch")
    assert {item["init"] for item in stages["evaluate"]["foreach"].values()} == {
        "simclr/base/seed0", "byol/base/seed0", "scratch"}
    # The names of simclr's stages are those of a run with simclr alone: adding byol renames none.
    single = copy_workflow(tmp_path / "single")
    versioning("dvc-yaml", *SMOKE, cwd=single)
    alone = yaml.safe_load((single / "dvc.yaml").read_text())["stages"]
    assert {"pretrain_simclr", "knn_probe_simclr", "finetune_simclr-base-seed0"} <= set(alone)
    # Same deps, params and outs; only cmd differs, since it names this test's extra config file.
    for name in ("pretrain_simclr", "knn_probe_simclr", "linear_probe_simclr", "finetune_simclr-base-seed0"):
        assert {k: v for k, v in stages[name].items() if k not in ("cmd", "do")} == \
            {k: v for k, v in alone[name].items() if k not in ("cmd", "do")}


def test_stages_mirror_the_rules_and_name_config_keys_one_by_one(recorded):
    repo, _ = recorded
    stages = dvc("stage", "list", "--name-only", cwd=repo).stdout.split()
    assert stages[:3] == ["download", "preprocess", "label_subset@0.1"]
    assert {"pretrain_simclr", "knn_probe_simclr", "linear_probe_simclr", "report", "finetune_simclr-base-seed0@0.1",
            "finetune_scratch@1", "evaluate@simclr-base-seed0-0.1", "evaluate@scratch-1"} <= set(stages)
    assert len([stage for stage in stages if stage.startswith("finetune")]) == 4  # one per run
    lock = (repo / "dvc.lock").read_text()
    assert "pretrain.augment.crop_scale" in lock and "pretrain.epochs" in lock
    pipeline = (repo / "dvc.yaml").read_text()
    assert "cmd: snakemake --cores all --allowed-rules pretrain --configfile config/experiments/smoke.yaml" in pipeline


# ---------------------------------------------------------------------------------------------------
# record, push, pull
# ---------------------------------------------------------------------------------------------------

def test_after_record_dvc_and_snakemake_both_see_nothing_to_do(recorded):
    repo, _ = recorded
    assert "Data and pipelines are up to date" in dvc("status", cwd=repo).stdout
    repro = dvc("repro", cwd=repo)
    assert "Running stage" not in repro.stdout + repro.stderr
    dry = snakemake(repo, "-n", "--cores", "1", *SMOKE)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_round_trip_through_the_remote_restores_every_output_byte_for_byte(recorded, tmp_path):
    repo, _ = recorded
    clone = fresh_clone(recorded, tmp_path / "clone")
    assert not (clone / "results").exists()
    versioning("pull", cwd=clone)

    outputs = locked_outputs(repo)
    assert {"results/pretrain/simclr/base/seed0/encoder.pt", "results/finetune/scratch/fraction1/seed0/model.pt",
            "results/metrics.json", "results/evaluate/knn/simclr/base/seed0.json",
            "results/evaluate/linear/simclr/base/seed0.json", "results/data/train_images.npy"} <= set(outputs)
    assert fingerprints(clone, outputs) == fingerprints(repo, outputs)

    dry = snakemake(clone, "-n", "--cores", "1", *SMOKE)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    real = snakemake(clone, "--cores", "1", *SMOKE)
    assert "Nothing to be done" in real.stdout + real.stderr
    assert "localrule" not in real.stderr and "rule pretrain" not in real.stderr


def test_a_tampered_checkpoint_is_reported_by_dvc_status(recorded, tmp_path):
    clone = fresh_clone(recorded, tmp_path / "clone")
    versioning("pull", cwd=clone)
    encoder = clone / "results" / "pretrain" / "simclr" / "base" / "seed0" / "encoder.pt"
    encoder.write_bytes(encoder.read_bytes() + b"tampered")
    status = dvc("status", cwd=clone).stdout
    assert "pretrain_simclr:" in status and "modified:           results/pretrain/simclr/base/seed0/encoder.pt" in status


@pytest.mark.parametrize("remote", ["empty", "unreachable"])
def test_pulling_from_a_bad_remote_fails_clearly_and_leaves_the_workspace_alone(recorded, tmp_path, remote):
    clone = fresh_clone(recorded, tmp_path / "clone")
    url = {"empty": str(tmp_path / "empty-remote"), "unreachable": "http://127.0.0.1:9/store"}[remote]
    (tmp_path / "empty-remote").mkdir()
    dvc("remote", "modify", "--local", "store", "url", url, cwd=clone)
    notes = clone / "results" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("a researcher's own file\n")
    before = workspace_state(clone)

    result = versioning("pull", cwd=clone, check=False)
    assert result.returncode == 1
    assert "could not fetch the outputs recorded in dvc.lock from the DVC remote" in result.stderr
    assert "the workspace was left as it was" in result.stderr
    assert f"nor on remote 'store' ({url})" in result.stderr
    assert workspace_state(clone) == before


def test_record_refuses_outputs_that_snakemake_would_still_rebuild(recorded, tmp_path):
    clone = fresh_clone(recorded, tmp_path / "clone")
    versioning("pull", cwd=clone)
    config = clone / "config" / "config.yaml"
    config.write_text(config.read_text().replace("knn_k: 20", "knn_k: 7"))
    result = versioning("record", cwd=clone, check=False)
    assert result.returncode == 1 and "Snakemake would still run jobs" in result.stderr


# ---------------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------------

def test_an_experiment_reruns_only_the_stages_its_key_affects(recorded, tmp_path):
    clone = fresh_clone(recorded, tmp_path / "clone")
    versioning("pull", cwd=clone)
    experiment = dvc("exp", "run", "-n", "knn-k-5", "-S", "config/config.yaml:evaluate.knn_k=5", cwd=clone)
    ran = {line.split("'")[1] for line in experiment.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"knn_probe_simclr", "report"}

    table = list(csv.DictReader(io.StringIO(dvc("exp", "show", "--csv", cwd=clone).stdout)))
    knn_k = {row["Experiment"] or row["rev"]: row["evaluate.knn_k"] for row in table}
    assert knn_k["knn-k-5"] == "5" and knn_k["workspace"] == "5"
    assert [row["k"] for row in table if row["Experiment"] == "knn-k-5"] == ["5"]

    diff = json.loads(dvc("metrics", "diff", "--json", cwd=clone).stdout)
    assert diff["results/evaluate/knn/simclr/base/seed0.json"]["k"] == {"old": 20, "new": 5, "diff": -15}
    assert "encoder_accuracy" in diff["results/evaluate/knn/simclr/base/seed0.json"]

    dvc("plots", "diff", "-o", str(tmp_path / "plots"), cwd=clone)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "pretraining loss" in page and "fine-tuning validation accuracy" in page


def test_an_objectives_key_reruns_its_own_stages_and_another_objectives_key_none(recorded, tmp_path):
    """simclr's temperature reruns simclr's pretraining and what follows from it, not the scratch runs;
    a key of byol, which the experiment does not pretrain with, reruns nothing. Over 60 s (120 s
    in the clean-clone CI run, 2-core AMD EPYC, 2026-12-02): DVC really runs the 8 stages, each importing torch;
    which ones ran is the assertion."""
    clone = fresh_clone(recorded, tmp_path / "clone")
    versioning("pull", cwd=clone)
    experiment = dvc("exp", "run", "-n", "objective-keys", "-S", "config/config.yaml:pretrain.simclr.temperature=0.3",
                     "-S", "config/config.yaml:pretrain.byol.base_momentum=0.9", cwd=clone)
    ran = {line.split("'")[1] for line in experiment.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"pretrain_simclr", "knn_probe_simclr", "linear_probe_simclr", "finetune_simclr-base-seed0@0.1",
                   "finetune_simclr-base-seed0@1", "evaluate@simclr-base-seed0-0.1", "evaluate@simclr-base-seed0-1",
                   "report"}


def test_keys_an_experiment_named_by_key_sets_are_tracked_in_its_file(tmp_path):
    """With `experiment: smoke` in a config file, DVC tracks smoke.yaml's keys there, the rest in the
    defaults, and the file's own keys in the file."""
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "mine.yaml").write_text(yaml.safe_dump({"experiment": "smoke", "finetune": {"epochs": 2}}))
    sources = param_sources(["pretrain.epochs", "pretrain.learning_rate", "finetune.epochs"], ["mine.yaml"], workdir)
    assert sources == [{"config/config.yaml": ["pretrain.learning_rate"]},
                       {"config/experiments/smoke.yaml": ["pretrain.epochs"]}, {"mine.yaml": ["finetune.epochs"]}]
