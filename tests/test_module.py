"""The workflow used as a Snakemake module by another project, as `snakedeploy deploy-workflow` sets it up.

snakedeploy 0.17.1 deploys from a local clone (its Local provider): it copies config/ and profiles/ and
writes workflow/Snakefile with the `module` declaration. For a local source it writes the module's
snakefile as the path inside the source ("Snakefile"), which Snakemake resolves against the deploying
project's workflow/ folder, where there is none; for GitHub it writes github(..., tag=...). So the test
points that one line at the tagged clone's Snakefile, as github() would at the tagged file, and keeps the
rest of what snakedeploy wrote.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_workflow, snakemake
from tests.test_slurm import assert_same_encoder
from tests.test_workflow import read_summary

pytestmark = pytest.mark.workflow
TAG = "v0.0.0-test"


def git(directory: Path, *args) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=directory,
                   check=True, capture_output=True)


def tagged_clone(root: Path) -> Path:
    """This checkout's workflow as a git repository with a local tag (what a release would be)."""
    upstream = copy_workflow(root / "upstream")
    git(upstream, "init", "-q")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", "release")
    git(upstream, "tag", TAG)
    return upstream


def test_a_project_deployed_with_snakedeploy_runs_the_smoke_dag_as_a_module(real_smoke_run, tmp_path):
    """A fresh project whose config/config.yaml only says `experiment: smoke`: the whole smoke DAG runs
    from the module, its outputs land in the project's results/, and they equal this checkout's smoke run:
    the same data arrays, the same encoder tensor for tensor, the same accuracies. Over 60 s (about 90 s on
    two cores): it is one whole smoke DAG, which is the point; the checkout's run is the shared fixture."""
    reference, _ = real_smoke_run
    upstream = tagged_clone(tmp_path)
    project = tmp_path / "project"
    deployed = subprocess.run([Path(sys.executable).parent / "snakedeploy", "deploy-workflow", str(upstream),
                               str(project), "--tag", TAG, "--name", "ssl"], capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stderr
    snakefile = project / "workflow" / "Snakefile"
    declaration = snakefile.read_text()
    assert "module ssl:" in declaration and "use rule * from ssl" in declaration
    assert 'configfile: "config/config.yaml"' in declaration
    assert '        "Snakefile"\n' in declaration  # the local provider's path, see the module docstring
    snakefile.write_text(declaration.replace('        "Snakefile"\n', f'        "{upstream / "Snakefile"}"\n'))
    assert (project / "config" / "experiments" / "smoke.yaml").is_file()  # snakedeploy copied config/
    (project / "config" / "config.yaml").write_text("experiment: smoke\n")

    snakemake(project, "--cores", "2")
    assert not (upstream / "results").exists()
    for name in ["train_images.npy", "train_labels.npy", "val_images.npy", "test_images.npy", "normalization.json"]:
        assert (project / "results" / "data" / name).read_bytes() == \
            (reference / "results" / "data" / name).read_bytes(), name
    assert_same_encoder(project, reference)
    key = lambda row: (row["init"], row["label_fraction"], row["seed"])
    ours, theirs = sorted(read_summary(project), key=key), sorted(read_summary(reference), key=key)
    assert len(ours) == 4
    assert [(key(row), row["test_accuracy"]) for row in ours] == [(key(row), row["test_accuracy"]) for row in theirs]
    assert (project / "results" / "report.md").is_file()


def test_an_unknown_experiment_is_a_config_error_naming_the_key(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "typo.yaml").write_text(yaml.safe_dump({"experiment": "smoek"}))
    failed = snakemake(workdir, "-n", "--configfile", "typo.yaml", check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert f"config key experiment: 'smoek' is not an experiment of {workdir}/config/experiments" in output
    assert "(there are: cifar10, cifar100, imagenet, imagenet100, methods, mnist, reproduce-simclr, smoke, stl10)" in output
