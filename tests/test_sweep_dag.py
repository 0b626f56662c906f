"""A sweep with pretraining seeds as a real Snakemake DAG (synthetic IDX data over loopback HTTP): shared
jobs exist once, adding a variant reruns nothing, and the claims table and the HTML report (opened in
headless Chromium) come out of it."""
import base64
import csv
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import copy_workflow, require, serve_directory, snakemake, write_synthetic_idx

pytestmark = pytest.mark.workflow
CLAIMS = {"claims": [
    {"id": "temperature", "statement": "A moderate temperature beats a high one.", "source": "SimCLR §5.1",
     "experiment": "sweep.yaml", "metric": "linear_probe_accuracy",
     "compare": {"type": "greater", "a": "temperature~0.2", "b": "temperature~5.0"}, "test": "welch",
     "why": "independent runs"},
    {"id": "gain", "statement": "Pretraining helps at 50 % labels.", "source": "SimCLRv2 §1",
     "experiment": "sweep.yaml", "metric": "pretraining_gain", "fraction": 0.5,
     "compare": {"type": "at_least", "variant": "base", "published": 0.0, "tolerance": 0.0}},
]}


def job_counts(workdir, *config_args) -> dict:
    plan = snakemake(workdir, "-n", "--cores", "2", *config_args).stdout
    table = plan.split("Job stats:")[1].split("\n\n")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if name != "total"}


def rendered_dom(html_path) -> str:
    """The DOM of the page after its scripts ran, without the scripts and styles themselves."""
    chromium = shutil.which("chromium")
    require(chromium is not None, "chromium is missing: install Debian's package chromium")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=180,
                         check=True).stdout
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)


def test_a_sweep_with_pretraining_seeds_shares_jobs_adds_variants_alone_and_reports_claims(tmp_path, http_server):
    """Over 60 s (92 s in the clean-clone CI run, 2-core AMD EPYC, 2026-12-02): the claims need 2 pretraining seeds
    of 2 variants, so 4
    pretraining runs and their probes, 21 jobs in all; then the report is opened in headless Chromium."""
    url, routes = http_server
    files = write_synthetic_idx(tmp_path / "served", num_classes=3, size=12, train_per_class=80)
    serve_directory(routes, tmp_path / "served", prefix="/synthetic")
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "config" / "claims" / "sweep.yaml").write_text(yaml.safe_dump(CLAIMS))
    sweep = {
        "dataset": {"name": "synthetic", "mirrors": [f"{url}/synthetic"], "files": files, "class_names": []},
        "data": {"validation_fraction": 0.25},
        "pretrain": {"seeds": [0, 1], "epochs": 2},
        # Fine-tuning from the base encoders only (and from scratch): every variant is still probed.
        "finetune": {"label_fractions": [0.5], "seeds": [0], "min_steps": 10, "variants": ["base"]},
        # 0.2 is the base config's temperature: that row is the base run, not a second copy of it.
        "sweeps": {"temperature": {"pretrain.simclr.temperature": [0.2, 5.0]}},
        "claims": {"files": ["config/claims/sweep.yaml"]},
    }
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    config_args = ("--configfile", "config/experiments/smoke.yaml", "sweep.yaml")

    # 2 variants x 2 pretraining seeds; scratch runs and data jobs once, not per variant.
    assert job_counts(workdir, *config_args) == {
        "download": 1, "preprocess": 1, "label_subset": 1, "pretrain": 4, "knn_probe": 4, "linear_probe": 4,
        "finetune": 2 + 1, "evaluate": 3, "claims": 1, "report": 1, "all": 1}
    snakemake(workdir, "--cores", "2", *config_args)
    results = workdir / "results"
    assert sorted(p.relative_to(results / "pretrain").as_posix() for p in results.glob("pretrain/**/encoder.pt")) == [
        "simclr/base/seed0/encoder.pt", "simclr/base/seed1/encoder.pt",
        "simclr/temperature~5.0/seed0/encoder.pt", "simclr/temperature~5.0/seed1/encoder.pt"]
    checkpoint = json.loads((results / "evaluate" / "linear" / "simclr" / "temperature~5.0" / "seed1.json").read_text())
    assert (checkpoint["variant"], checkpoint["pretrain_seed"]) == ("temperature~5.0", 1)

    with open(results / "claims.csv", newline="") as handle:
        claims = list(csv.DictReader(handle))
    assert [claim["id"] for claim in claims] == ["temperature", "gain"]
    assert all(claim["verdict"] in ("supported", "contradicted", "inconclusive") for claim in claims)
    assert "temperature~0.2: " in claims[0]["groups"] and "(n=2)" in claims[0]["groups"]
    assert claims[1]["groups"].startswith("base: ") and "(n=2)" in claims[1]["groups"]  # 2 pretraining seeds
    report = (results / "report.md").read_text()
    assert report.split("\n")[2] == "## Claims" and "| temperature~0.2 > temperature~5.0 |" in report
    assert "| simclr temperature~5.0, seed 1 |" in report

    # Adding a variant runs its own jobs, the claims and the report; nothing that exists.
    sweep["sweeps"]["temperature"]["pretrain.simclr.temperature"].append(1.0)
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert job_counts(workdir, *config_args) == {
        "pretrain": 2, "knn_probe": 2, "linear_probe": 2, "claims": 1, "report": 1, "all": 1}
    sweep["sweeps"]["temperature"]["pretrain.simclr.temperature"].pop()
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    # The HTML report, on its own: the claims and label-efficiency tables on its front page, the plots in it.
    snakemake(workdir, "--cores", "1", *config_args, "--report", "results/report.html")
    page = (results / "report.html").read_text()
    dom = rendered_dom(results / "report.html")
    claims_table = re.search(r'<table class="results" id="claims">(.*?)</table>', dom, re.S).group(1)
    assert claims_table.count("<tr>") == 1 + len(claims) and claims[0]["verdict"] in claims_table
    efficiency = re.search(r'<table class="results" id="label-efficiency">(.*?)</table>', dom, re.S).group(1)
    assert "simclr" in efficiency and "scratch" in efficiency
    for category in ("Results", "Tables", "Training"):
        assert f">{category}<" in dom
    for plot in ("label_efficiency.png", "training_curves.png", "confusion_matrix.png"):
        encoded = re.search(rf'data:image/png;[^"]*?filename={re.escape(plot)};base64,([A-Za-z0-9+/=]+)', page)
        assert encoded and base64.b64decode(encoded.group(1)[:24])[:8] == b"\x89PNG\r\n\x1a\n", plot
