"""Gather every run into results/summary.csv, a Markdown report and its plots."""
import csv
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ssl_pipeline.artifacts import atomic_path, write_json, write_text  # noqa: E402

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["init", "label_fraction", "seed", "mode", "labeled_images", "test_accuracy",
                   "best_val_accuracy", "best_step", "parameters"]
INIT_STYLE = {"pretrained": {"color": "tab:blue", "linestyle": "-"},
              "scratch": {"color": "tab:orange", "linestyle": "--"}}


def read_csv(path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summary_rows(run_metrics: list) -> list:
    rows = [{**{key: metrics[key] for key in SUMMARY_COLUMNS if key in metrics},
             "test_accuracy": metrics["accuracy"]} for metrics in run_metrics]
    return sorted(rows, key=lambda row: (row["init"], row["label_fraction"], row["seed"]))


def write_summary(path, rows) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows) -> dict:
    """(init, label_fraction) -> {mean, std, n, labeled_images}; std is the sample std over seeds."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["init"], row["label_fraction"])].append(row)
    result = {}
    for key, members in groups.items():
        accuracies = [m["test_accuracy"] for m in members]
        result[key] = {"mean": statistics.mean(accuracies), "n": len(accuracies),
                       "std": statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan"),
                       "labeled_images": members[0]["labeled_images"]}
    return result


def headline_metrics(stats) -> dict:
    """{"test_accuracy": {init: {"10%": {"mean", "std", "seeds"}}}}; std is null for a single seed."""
    metrics = defaultdict(dict)
    for (init, fraction), cell in sorted(stats.items()):
        metrics[init][f"{100 * fraction:g}%"] = {
            "mean": round(cell["mean"], 5), "std": None if cell["n"] < 2 else round(cell["std"], 5),
            "seeds": cell["n"]}
    return {"test_accuracy": dict(metrics)}


def mean_std(cell) -> str:
    if cell is None:
        return "—"
    if cell["n"] < 2:
        return f"{cell['mean']:.4f} (1 seed)"
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------

def plot_label_efficiency(path, stats, fractions, inits) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for init in inits:
        points = [(f, stats[(init, f)]) for f in fractions if (init, f) in stats]
        axis.errorbar([100 * f for f, _ in points], [c["mean"] for _, c in points],
                      yerr=[0 if c["n"] < 2 else c["std"] for _, c in points], marker="o", capsize=3,
                      label=init, **INIT_STYLE.get(init, {}))
    axis.set_xscale("log")
    axis.set_xlabel("labels used (% of the training split)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def plot_training_curves(path, pretrain_curve, finetune_curves) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([int(r["epoch"]) for r in pretrain_curve], [float(r["loss"]) for r in pretrain_curve],
              marker="o")
    left.set_xlabel("pretraining epoch")
    left.set_ylabel("contrastive loss")
    left.set_title("pretraining")
    fractions = sorted({run["label_fraction"] for run, _ in finetune_curves})
    colours = plt.colormaps["viridis"].resampled(max(2, len(fractions)))
    labelled = set()
    for run, curve in finetune_curves:
        key = (run["init"], run["label_fraction"])
        right.plot([int(r["step"]) for r in curve], [float(r["val_accuracy"]) for r in curve],
                   color=colours(fractions.index(run["label_fraction"])),
                   linestyle=INIT_STYLE.get(run["init"], {}).get("linestyle", "-"), alpha=0.8,
                   label=None if key in labelled else f"{run['init']}, {100 * run['label_fraction']:g}% labels")
        labelled.add(key)
    right.set_xlabel("fine-tuning step")
    right.set_ylabel("validation accuracy")
    right.set_title("fine-tuning (every seed)")
    right.legend(fontsize=7)
    save_figure(figure, path)


def plot_confusion_matrices(path, matrices: dict, class_names) -> None:
    """matrices: title -> summed confusion matrix (rows: true class); drawn row-normalised."""
    figure, axes = plt.subplots(1, len(matrices), figsize=(5.5 * len(matrices), 5), squeeze=False)
    for axis, (title, matrix) in zip(axes[0], matrices.items()):
        normalised = [[value / max(1, sum(row)) for value in row] for row in matrix]
        axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(normalised):
            for j, value in enumerate(row):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="white" if value > 0.5 else "black")
        axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(class_names)), class_names, fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title, fontsize=9)
    save_figure(figure, path)


def save_figure(figure, path) -> None:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------

def label_efficiency_table(stats, fractions, inits) -> list:
    lines = ["| labels | labeled images | " + " | ".join(inits) + " | pretrained − scratch |",
             "|---:|---:|" + "---:|" * len(inits) + "---:|"]
    for fraction in fractions:
        cells = [stats.get((init, fraction)) for init in inits]
        images = next(c["labeled_images"] for c in cells if c)
        pre, scratch = stats.get(("pretrained", fraction)), stats.get(("scratch", fraction))
        gain = f"{pre['mean'] - scratch['mean']:+.4f}" if pre and scratch else "—"
        lines.append(f"| {100 * fraction:g}% | {images} | " + " | ".join(mean_std(c) for c in cells)
                     + f" | {gain} |")
    return lines


def reference_table(references, stats, largest_fraction, parameters) -> list:
    lines = ["| model | parameters | test accuracy | source |", "|---|---:|---:|---|"]
    for init in ("pretrained", "scratch"):
        cell = stats.get((init, largest_fraction))
        if cell:
            lines.append(f"| **ours**, {init}, {100 * largest_fraction:g}% labels | {parameters:,} | "
                         f"**{mean_std(cell)}** | this run |")
    for ref in references:
        lines.append(f"| {ref['model']} | {ref.get('parameters', '—')} | {ref['test_accuracy']:.3f} | "
                     f"{ref['source']} |")
    return lines


def build_report(run_metrics, finetune_curves, pretrain_curve, knn, card, settings, out_dir) -> dict:
    """Write summary.csv, metrics.json, report.md and plots/*.png under `out_dir`. settings: config `report`."""
    out_dir = Path(out_dir)
    rows = summary_rows(run_metrics)
    write_summary(out_dir / "summary.csv", rows)
    stats = aggregate(rows)
    fractions = sorted({row["label_fraction"] for row in rows})
    inits = [init for init in ("pretrained", "scratch") if any(row["init"] == init for row in rows)]
    largest = fractions[-1]
    seeds = sorted({row["seed"] for row in rows})

    plot_label_efficiency(out_dir / "plots" / "label_efficiency.png", stats, fractions, inits)
    plot_training_curves(out_dir / "plots" / "training_curves.png", pretrain_curve, finetune_curves)
    matrices = {}
    for init in inits:
        runs = [m for m in run_metrics if m["init"] == init and m["label_fraction"] == largest]
        summed = [[sum(m["confusion_matrix"][i][j] for m in runs) for j in range(card["num_classes"])]
                  for i in range(card["num_classes"])]
        matrices[f"{init}, {100 * largest:g}% labels, {len(runs)} seeds summed"] = summed
    plot_confusion_matrices(out_dir / "plots" / "confusion_matrix.png", matrices, card["class_names"])

    mode = run_metrics[0]["mode"]
    last_epoch = pretrain_curve[-1]
    lines = [
        f"# {settings['title']}",
        "",
        f"Dataset **{card['dataset']}**: {card['splits']['train']['count']} training, "
        f"{card['splits']['val']['count']} validation and {card['splits']['test']['count']} test images of "
        f"shape {tuple(card['image_shape'])}, {card['num_classes']} classes. Fine-tuning mode **{mode}**, "
        f"seeds {seeds}. Every number below is a test-set accuracy; the validation split only picks the "
        "checkpoint. All runs are listed in [summary.csv](summary.csv).",
        "",
        "## Label efficiency",
        "",
        f"Test accuracy, mean ± sample standard deviation over {len(seeds)} seeds.",
        "",
        *label_efficiency_table(stats, fractions, inits),
        "",
        "![label-efficiency curve](plots/label_efficiency.png)",
        "",
        "## Self-supervised encoder: kNN probe",
        "",
        f"Weighted kNN (k={knn['k']}, cosine similarity, temperature {knn['temperature']}) on the test set, "
        f"with the {knn['memory_bank_size']} labeled training images as memory bank.",
        "",
        "| features | kNN test accuracy |",
        "|---|---:|",
        f"| pretrained encoder ({last_epoch['epoch']} epochs, final loss {float(last_epoch['loss']):.4f}) "
        f"| {knn['encoder_accuracy']:.4f} |",
        f"| raw pixels | {knn['raw_pixel_accuracy']:.4f} |",
        "",
        "## Beside published results",
        "",
        *reference_table(settings["references"], stats, largest, run_metrics[0]["parameters"]),
        "",
        "## Training curves",
        "",
        "![training curves](plots/training_curves.png)",
        "",
        "## Confusion matrices",
        "",
        "![confusion matrices](plots/confusion_matrix.png)",
        "",
    ]
    write_text(out_dir / "report.md", "\n".join(lines))
    write_json(out_dir / "metrics.json", headline_metrics(stats))
    log.info("wrote %s", out_dir / "report.md")
    return stats
