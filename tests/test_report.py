"""The report's comparison of methods, on hand-made runs: one column per method, the best gain over
scratch, a collapsed objective flagged, sweep variants and pretraining seeds pooled with CIs, and the
claims section."""
import math

from ssl_pipeline.stages.report import (aggregate, claims_section, collapse_notes, label_efficiency_table,
                                 pretraining_runs, pretraining_table, summary_rows)


def run(init, objective, fraction, seed, accuracy, variant="base", pretrain_seed=0):
    pretrained = init == "pretrained"
    return {"init": init, "objective": objective, "label_fraction": fraction, "seed": seed, "mode": "full",
            "variant": variant if pretrained else None, "pretrain_seed": pretrain_seed if pretrained else None,
            "labeled_images": int(1000 * fraction), "accuracy": accuracy, "best_val_accuracy": accuracy,
            "best_step": 10, "parameters": 1234}


def curve(collapsed: bool, std: float):
    return [{"epoch": "5", "loss": "1.5", "embedding_std": str(std), "elapsed_seconds": "200.0",
             "images_per_second": "2500.0", "collapsed": str(collapsed)}]


def knn(objective, accuracy):
    return {"objective": objective, "k": 20, "temperature": 0.07, "memory_bank_size": 1000,
            "encoder_accuracy": accuracy, "raw_pixel_accuracy": 0.8}


def test_one_column_per_method_and_the_best_pretrained_gain_over_scratch():
    runs = [run("pretrained", "simclr", 0.1, seed, 0.80 + seed / 100) for seed in (0, 1)]
    runs += [run("pretrained", "byol", 0.1, seed, 0.85) for seed in (0, 1)]
    runs += [run("scratch", None, 0.1, seed, 0.70) for seed in (0, 1)]
    rows = summary_rows(runs)
    assert {row["objective"] for row in rows} == {"simclr", "byol", "none"}
    lines = label_efficiency_table(aggregate(runs), [0.1], ["simclr", "byol", "scratch"])
    assert lines[0] == "| labels | labeled images | simclr | byol | scratch | best pretrained − scratch |"
    assert lines[2] == "| 10% | 100 | 0.8050 ± 0.0071 | 0.8500 ± 0.0000 | 0.7000 ± 0.0000 | +0.1500 (byol) |"


def test_a_collapsed_objective_is_flagged_beside_a_healthy_one():
    pretraining = {"simclr": {"curve": curve(False, 0.2), "knn": knn("simclr", 0.86), "linear": {"accuracy": 0.81}},
                   "byol": {"curve": curve(True, 0.001), "knn": knn("byol", 0.1), "linear": {"accuracy": 0.1}}}
    table = pretraining_table(pretraining)
    assert table[2].startswith("| simclr | 5 | 1.5000 | 0.2000 | 0.8600 | 0.8100 | 200 s | 2500 |")
    assert table[3].startswith("| **byol: COLLAPSED** | 5 | 1.5000 | 0.0010 | 0.1000 | 0.1000 |")
    assert table[4] == "| raw pixels | — | — | — | 0.8000 | — | — | — |"
    assert "**Collapse:** byol mapped every image" in "\n".join(collapse_notes(pretraining))
    assert collapse_notes({"simclr": pretraining["simclr"]}) == []
    # config evaluate.knn_raw_pixels: false (the ImageNet experiments): the probe wrote null, and the row goes.
    for run_ in pretraining.values():
        run_["knn"]["raw_pixel_accuracy"] = None
    assert [line for line in pretraining_table(pretraining) if "raw pixels" in line] == []


def test_the_report_says_where_each_pretraining_run_ran():
    """The world size and nodes of the encoder's card (config compute.nodes), copied by the kNN probe for
    data-parallel runs."""
    two_nodes = {**knn("simclr", 0.86), "pretraining_world": {"world_size": 4, "nodes": ["n1", "n2"],
                                                                "rank_nodes": ["n1", "n1", "n2", "n2"]}}
    # One process: the probe writes no world (its metrics name no machine), and the report says nothing of it.
    pretraining = {"simclr": {"curve": curve(False, 0.2), "knn": two_nodes, "linear": {"accuracy": 0.81}},
                   "byol": {"curve": curve(False, 0.2), "knn": knn("byol", 0.85), "linear": {"accuracy": 0.8}}}
    assert pretraining_table(pretraining)[-1] == (
        "Pretraining ran data-parallel as follows: simclr: 4 process(es) on 2 node(s) (n1, n2).")
    older = {"simclr": {"curve": curve(False, 0.2), "knn": knn("simclr", 0.86), "linear": {"accuracy": 0.81}}}
    assert pretraining_table(older)[-1].startswith("| raw pixels |")  # a card without a world says nothing


def test_a_linear_probe_that_did_not_converge_is_marked():
    pretraining = {"simclr": {"curve": curve(False, 0.2), "knn": knn("simclr", 0.86),
                              "linear": {"accuracy": 0.81, "converged": False}},
                   "byol": {"curve": curve(False, 0.2), "knn": knn("byol", 0.85),
                            "linear": {"accuracy": 0.8, "converged": True}}}
    table = pretraining_table(pretraining)
    assert "| 0.8600 | 0.8100 (**not converged**) | 200 s |" in table[2]
    assert "| 0.8500 | 0.8000 | 200 s |" in table[3]


def test_variants_are_methods_of_their_own_and_seeds_of_both_stages_pool_with_a_t_interval():
    runs = [run("pretrained", "simclr", 1.0, seed, 0.80 + seed / 100 + pretrain_seed / 50,
                pretrain_seed=pretrain_seed) for seed in (0, 1) for pretrain_seed in (0, 1)]
    runs += [run("pretrained", "simclr", 1.0, 0, 0.6, variant="temperature~1.0", pretrain_seed=s) for s in (0, 1)]
    stats = aggregate(runs)
    assert set(stats) == {("simclr", 1.0), ("simclr temperature~1.0", 1.0)}
    cell = stats[("simclr", 1.0)]
    values = [0.80, 0.81, 0.82, 0.83]
    mean = sum(values) / 4
    half = 3.182446305284263 * math.sqrt(sum((v - mean) ** 2 for v in values) / 3) / 2  # t(0.975, 3)
    assert cell["n"] == 4 and math.isclose(cell["mean"], mean)
    assert math.isclose(cell["ci_low"], mean - half) and math.isclose(cell["ci_high"], mean + half)
    assert {row["variant"] for row in summary_rows(runs)} == {"base", "temperature~1.0"}


def test_pretraining_runs_are_named_by_method_and_by_seed_only_when_there_are_several():
    def probe(variant, seed):
        return {"knn": {**knn("simclr", 0.8), "variant": variant, "pretrain_seed": seed}, "curve": curve(False, 0.2)}

    assert list(pretraining_runs([probe("base", 0), probe("projection~none", 0)])) == [
        "simclr", "simclr projection~none"]
    assert list(pretraining_runs([probe("base", 0), probe("base", 1)])) == ["simclr, seed 0", "simclr, seed 1"]


def test_the_claims_section_counts_verdicts_and_says_how_many_seeds_an_inconclusive_claim_needs():
    claim = {"statement": "A | B", "source": "paper §1", "metric": "linear_probe_accuracy", "comparison": "a > b",
             "groups": "a: 0.8 (n=3)", "difference": "0.01", "p_value": "0.2", "seeds_needed": "12"}
    lines = claims_section([{**claim, "verdict": "inconclusive"}, {**claim, "verdict": "supported", "seeds_needed": ""}])
    assert lines[0] == "## Claims"
    assert "2 claims checked (1 inconclusive, 1 supported)" in lines[2]
    assert lines[6].startswith("| A / B | paper §1 |") and lines[6].endswith("**inconclusive** (about 12 seeds needed) |")
    assert lines[7].endswith("| **supported** |")
    assert claims_section(None) == []
