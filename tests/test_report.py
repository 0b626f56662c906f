"""The report's comparison of methods, on hand-made runs: one column per method, the best gain over
scratch, and a collapsed objective flagged."""
from ssl_pipeline.report import aggregate, collapse_notes, label_efficiency_table, pretraining_table, summary_rows


def run(init, objective, fraction, seed, accuracy):
    return {"init": init, "objective": objective, "label_fraction": fraction, "seed": seed, "mode": "full",
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
    lines = label_efficiency_table(aggregate(rows), [0.1], ["simclr", "byol", "scratch"])
    assert lines[0] == "| labels | labeled images | simclr | byol | scratch | best pretrained − scratch |"
    assert lines[2] == "| 10% | 100 | 0.8050 ± 0.0071 | 0.8500 ± 0.0000 | 0.7000 ± 0.0000 | +0.1500 (byol) |"


def test_a_collapsed_objective_is_flagged_beside_a_healthy_one():
    pretraining = {"simclr": {"curve": curve(False, 0.2), "knn": knn("simclr", 0.86)},
                   "byol": {"curve": curve(True, 0.001), "knn": knn("byol", 0.1)}}
    table = pretraining_table(pretraining)
    assert table[2].startswith("| simclr | 5 | 1.5000 | 0.2000 | 0.8600 | 200 s | 2500 |")
    assert table[3].startswith("| **byol: COLLAPSED** | 5 | 1.5000 | 0.0010 | 0.1000 |")
    assert table[4] == "| raw pixels | — | — | — | 0.8000 | — | — |"
    assert "**Collapse:** byol mapped every image" in "\n".join(collapse_notes(pretraining))
    assert collapse_notes({"simclr": pretraining["simclr"]}) == []
