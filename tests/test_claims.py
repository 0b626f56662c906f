"""The claims rule's logic on hand-made results: each comparison type (greater, trend, at_least) gives
each verdict, pairing follows the seeds, and a claim that cannot be evaluated names its file and id."""
import csv

import pytest
import yaml

from ssl_pipeline.claims.check import ClaimError, check_claims

NAMES = {"base": "base", "projection~mlp": "base", "projection~linear": "projection~linear",
         "projection~none": "projection~none"}
SETTINGS = {"alpha": 0.05}


def probes(variant, accuracies):
    knn = [{"objective": "simclr", "variant": variant, "pretrain_seed": seed, "encoder_accuracy": a,
            "raw_pixel_accuracy": 0.8} for seed, a in enumerate(accuracies)]
    linear = [{"objective": "simclr", "variant": variant, "pretrain_seed": seed, "accuracy": a, "converged": True}
              for seed, a in enumerate(accuracies)]
    return knn, linear


def run(init, fraction, seed, accuracy, pretrain_seed=0):
    pretrained = init == "pretrained"
    return {"init": init, "objective": "simclr" if pretrained else None, "variant": "base" if pretrained else None,
            "pretrain_seed": pretrain_seed if pretrained else None, "label_fraction": fraction, "seed": seed,
            "accuracy": accuracy, "labeled_images": 10}


def check(tmp_path, claims, base, linear_head, none_head=(0.5, 0.51, 0.49), runs=()):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": claims}))
    knn, linear = [], []
    for variant, values in (("base", base), ("projection~linear", linear_head), ("projection~none", none_head)):
        k, lin = probes(variant, values)
        knn, linear = knn + k, linear + lin
    out = tmp_path / "claims.csv"
    check_claims([path], list(runs), knn, linear, SETTINGS, NAMES, out, tmp_path / "claims.html")
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def claim(compare, metric="linear_probe_accuracy", **extra):
    return {"id": "c", "statement": "s", "source": "p §1", "experiment": "e.yaml", "metric": metric,
            "compare": compare, **extra}


GREATER = claim({"type": "greater", "a": "projection~mlp", "b": "projection~linear"}, test="welch", why="independent")


@pytest.mark.parametrize("base, linear_head, verdict", [
    ((0.80, 0.81, 0.82), (0.70, 0.71, 0.72), "supported"),
    ((0.70, 0.71, 0.72), (0.80, 0.81, 0.82), "contradicted"),
    ((0.80, 0.70, 0.75), (0.76, 0.74, 0.73), "inconclusive"),
])
def test_greater_gives_each_verdict(tmp_path, base, linear_head, verdict):
    row, = check(tmp_path, [GREATER], base, linear_head)
    assert row["verdict"] == verdict and row["test"] == "Welch's t-test" and row["why"] == "independent"
    assert row["groups"].startswith("projection~mlp: ") and "(n=3)" in row["groups"]
    assert (row["seeds_needed"] != "") == (verdict == "inconclusive")
    assert "<table" in (tmp_path / "claims.html").read_text()


@pytest.mark.parametrize("none_head, linear_head, base, verdict", [
    ((0.5, 0.51, 0.49), (0.6, 0.61, 0.59), (0.7, 0.71, 0.69), "supported"),
    ((0.7, 0.71, 0.69), (0.6, 0.61, 0.59), (0.5, 0.51, 0.49), "contradicted"),
    ((0.6, 0.5, 0.7), (0.62, 0.55, 0.58), (0.6, 0.66, 0.55), "inconclusive"),
])
def test_a_trend_over_variants_gives_each_verdict(tmp_path, none_head, linear_head, base, verdict):
    trend = claim({"type": "trend", "over": "variants", "direction": "increasing",
                   "values": ["projection~none", "projection~linear", "projection~mlp"]})
    row, = check(tmp_path, [trend], base, linear_head, none_head)
    assert row["verdict"] == verdict and row["test"].startswith("t-test of the least-squares slope")


def test_at_least_a_published_number_and_a_decreasing_gain_over_label_fractions(tmp_path):
    runs = [run("scratch", f, seed, acc + seed / 1000) for f, acc in ((0.01, 0.5), (1.0, 0.9)) for seed in (0, 1, 2)]
    runs += [run("pretrained", f, seed, acc + seed / 1000 + p / 500, pretrain_seed=p)
             for f, acc in ((0.01, 0.7), (1.0, 0.91)) for seed in (0, 1, 2) for p in (0, 1)]
    claims = [
        claim({"type": "at_least", "variant": "scratch", "published": 0.925, "tolerance": 0.005},
              metric="test_accuracy", fraction=1.0),
        claim({"type": "at_least", "variant": "scratch", "published": 0.88, "tolerance": 0.0},
              metric="test_accuracy", fraction=1.0),
        claim({"type": "trend", "over": "fractions", "values": [0.01, 1.0], "direction": "decreasing"},
              metric="pretraining_gain", variant="base"),
        claim({"type": "greater", "a": "base", "a_fraction": 0.01, "b": "base", "b_fraction": 1.0},
              metric="pretraining_gain", test="paired", why="same seeds"),
    ]
    rows = check(tmp_path, claims, (0.8, 0.8, 0.8), (0.7, 0.7, 0.7), runs=runs)
    assert [row["verdict"] for row in rows] == ["contradicted", "supported", "supported", "supported"]
    # A gain pairs each pretrained run with the scratch run of its fine-tuning seed (0.2 + p / 500 exactly),
    # and a pretraining run's fine-tuning seeds are averaged: one value per pretraining seed.
    assert rows[2]["groups"].startswith("1% labels: 0.2010 [") and "(n=2)" in rows[2]["groups"]
    assert float(rows[2]["difference"]) < 0 and rows[3]["test"] == "paired t-test"
    assert rows[3]["comparison"] == "base at 1% labels > base at 100% labels"


@pytest.mark.parametrize("bad, fragment", [
    ({**GREATER, "compare": {"type": "greater", "a": "projection~tiny", "b": "base"}},
     "claim 'c': variant 'projection~tiny' is not in this run's sweeps"),
    ({key: value for key, value in GREATER.items() if key != "source"}, "claim 'c': missing field 'source'"),
    ({**GREATER, "metric": "top5"}, "claim 'c': metric 'top5' is not one of"),
    ({**GREATER, "test": None}, "needs test: welch or test: paired"),
    (claim({"type": "at_least", "variant": "scratch", "published": 0.9}, metric="test_accuracy"),
     "metric test_accuracy needs `fraction`"),
    (claim({"type": "trend", "values": ["base"], "direction": "increase"}), "compare.direction must be one of"),
    (claim({"type": "at_least", "variant": "base"}), "a 'at_least' comparison needs compare.published"),
    (claim({"type": "at_least", "variant": "scratch", "published": 0.0}, metric="pretraining_gain", fraction=1.0),
     "'scratch' has none"),
])
def test_a_claim_that_cannot_be_evaluated_names_its_file_and_id(tmp_path, bad, fragment):
    with pytest.raises(ClaimError) as error:
        check(tmp_path, [bad], (0.8, 0.8, 0.8), (0.7, 0.7, 0.7))
    assert fragment in str(error.value) and "claims.yaml" in str(error.value)
    assert not (tmp_path / "claims.csv").exists()
