"""Gather every run into results/summary.csv, a Markdown report and its plots."""
import csv
import logging
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ssl_pipeline.core.artifacts import atomic_path, write_json, write_text  # noqa: E402
from ssl_pipeline.claims.statistics import describe  # noqa: E402
from ssl_pipeline.core.html_table import write_html_table  # noqa: E402
from ssl_pipeline.core.results_table import SCRATCH, method_name, runs_frame  # noqa: E402

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["init", "objective", "variant", "pretrain_seed", "label_fraction", "seed", "mode",
                   "labeled_images", "test_accuracy", "best_val_accuracy", "best_step", "parameters"]
SCRATCH_STYLE = {"color": "tab:gray", "linestyle": "--"}
CLAIM_COLUMNS = ["statement", "source", "metric", "comparison", "groups", "difference", "p_value", "verdict"]


def method_of(row) -> str:
    """A run's method: the pretraining objective (and sweep variant) of its encoder, or 'scratch'."""
    return method_name(row.get("objective"), row.get("variant")) if row["init"] == "pretrained" else SCRATCH


def method_style(method: str, methods: list) -> dict:
    """Scratch dashed grey; each objective a colour of its own, by its place in `methods`."""
    if method == SCRATCH:
        return SCRATCH_STYLE
    return {"color": plt.colormaps["tab10"](methods.index(method) % 10), "linestyle": "-"}


def read_csv(path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summary_rows(run_metrics: list) -> list:
    rows = [{**{key: metrics[key] for key in SUMMARY_COLUMNS if key in metrics},
             "objective": metrics.get("objective") or "none", "variant": metrics.get("variant") or "none",
             "pretrain_seed": "none" if metrics.get("pretrain_seed") is None else metrics["pretrain_seed"],
             "test_accuracy": metrics["accuracy"]}
            for metrics in run_metrics]
    return sorted(rows, key=lambda row: (row["init"], row["objective"], str(row["variant"]),
                                         str(row["pretrain_seed"]), row["label_fraction"], row["seed"]))


def write_summary(path, rows) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def aggregate(run_metrics) -> dict:
    """(method, label_fraction) -> {mean, std, n, ci_low, ci_high, labeled_images}, over every seed of the
    method (pretraining and fine-tuning seeds alike); std is the sample std, the CI t-based at 95 %."""
    result = {}
    for key, group in runs_frame(run_metrics).groupby(["method", "label_fraction"], sort=False):
        values = group["test_accuracy"]
        interval = describe(values.to_numpy())
        result[key] = {"mean": float(values.mean()), "std": float(values.std()), "n": len(values),
                       "ci_low": interval["ci_low"], "ci_high": interval["ci_high"],
                       "labeled_images": int(group["labeled_images"].iloc[0])}
    return result


LABEL_EFFICIENCY_COLUMNS = ["method", "label_fraction", "labeled_images", "runs", "mean_test_accuracy", "std",
                            "ci95_low", "ci95_high"]


def write_label_efficiency(csv_path, html_path, stats) -> None:
    """The label-efficiency table as CSV and as an HTML page (for Snakemake's HTML report): one row per
    (method, label fraction)."""
    rows = [[method, fraction, cell["labeled_images"], cell["n"], f"{cell['mean']:.5f}",
             *(f"{cell[key]:.5f}" if cell["n"] > 1 else "" for key in ("std", "ci_low", "ci_high"))]
            for (method, fraction), cell in sorted(stats.items())]
    with atomic_path(csv_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_EFFICIENCY_COLUMNS)
        writer.writerows(rows)
    write_html_table(html_path, "Label efficiency", LABEL_EFFICIENCY_COLUMNS, rows,
                     "Test accuracy per method and share of labels: mean, sample std and t-based 95 % CI over "
                     "every run (pretraining and fine-tuning seeds).")


def headline_metrics(stats) -> dict:
    """{"test_accuracy": {method: {"10%": {"mean", "std", "seeds"}}}}; std is null for a single seed."""
    metrics = defaultdict(dict)
    for (method, fraction), cell in sorted(stats.items()):
        metrics[method][f"{100 * fraction:g}%"] = {
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

def plot_label_efficiency(path, stats, fractions, methods) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in methods:
        points = [(f, stats[(method, f)]) for f in fractions if (method, f) in stats]
        axis.errorbar([100 * f for f, _ in points], [c["mean"] for _, c in points],
                      yerr=[0 if c["n"] < 2 else c["std"] for _, c in points], marker="o", capsize=3,
                      label=method, **method_style(method, methods))
    axis.set_xscale("log")
    axis.set_xlabel("labels used (% of the training split)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def plot_training_curves(path, pretraining, finetune_curves, methods) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in pretraining.items():
        # The objectives' losses have different scales: each relative to its first epoch.
        losses = [float(r["loss"]) for r in run["curve"]]
        left.plot([int(r["epoch"]) for r in run["curve"]], [loss / losses[0] for loss in losses], marker="o",
                  label=name, **method_style(run["method"], methods))
    left.set_xlabel("pretraining epoch")
    left.set_ylabel("loss relative to epoch 1")
    left.set_title("pretraining")
    left.legend(fontsize=7)
    fractions = sorted({run["label_fraction"] for run, _ in finetune_curves})
    colours = plt.colormaps["viridis"].resampled(max(2, len(fractions)))
    labelled = set()
    for run, curve in finetune_curves:
        method = method_of(run)
        key = (method, run["label_fraction"])
        right.plot([int(r["step"]) for r in curve], [float(r["val_accuracy"]) for r in curve],
                   color=colours(fractions.index(run["label_fraction"])),
                   linestyle=method_style(method, methods)["linestyle"], alpha=0.8,
                   label=None if key in labelled else f"{method}, {100 * run['label_fraction']:g}% labels")
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

def label_efficiency_table(stats, fractions, methods) -> list:
    objectives = [method for method in methods if method != SCRATCH]
    gain = [f"best pretrained − {SCRATCH}"] if objectives and SCRATCH in methods else []
    lines = ["| labels | labeled images | " + " | ".join(methods + gain) + " |",
             "|---:|---:|" + "---:|" * len(methods + gain)]
    for fraction in fractions:
        cells = [stats.get((method, fraction)) for method in methods]
        images = next(c["labeled_images"] for c in cells if c)
        row = [mean_std(c) for c in cells]
        if gain:
            scratch = stats.get((SCRATCH, fraction))
            pretrained = [(stats[(o, fraction)]["mean"], o) for o in objectives if (o, fraction) in stats]
            best = max(pretrained) if pretrained else None
            row.append(f"{best[0] - scratch['mean']:+.4f} ({best[1]})" if best and scratch else "—")
        lines.append(f"| {100 * fraction:g}% | {images} | " + " | ".join(row) + " |")
    return lines


def pretraining_runs(pretraining: list) -> dict:
    """name -> pretraining run (with its method): the method, and the pretraining seed when there are several."""
    several_seeds = len({run["knn"].get("pretrain_seed", 0) for run in pretraining}) > 1
    named = {}
    for run in pretraining:
        method = method_name(run["knn"]["objective"], run["knn"].get("variant"))
        name = f"{method}, seed {run['knn'].get('pretrain_seed', 0)}" if several_seeds else method
        named[name] = {**run, "method": method}
    return named


def pretraining_table(pretraining: dict) -> list:
    """Per pretraining run: the encoder's kNN and linear-probe accuracy, its final loss and embedding
    spread, whether it collapsed, and what pretraining cost; raw pixels as the floor."""
    lines = ["| features | epochs | final loss | embedding std | kNN test accuracy | linear probe | pretraining time "
             "| views/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, run in pretraining.items():
        last = run["curve"][-1]
        collapsed = str(last.get("collapsed")) == "True"
        name = f"**{label}: COLLAPSED**" if collapsed else label
        linear = "—" if not run.get("linear") else f"{run['linear']['accuracy']:.4f}" + (
            "" if run["linear"].get("converged", True) else " (**not converged**)")
        lines.append(f"| {name} | {last['epoch']} | {float(last['loss']):.4f} | {float(last['embedding_std']):.4f} | "
                     f"{run['knn']['encoder_accuracy']:.4f} | {linear} | {float(last['elapsed_seconds']):.0f} s | "
                     f"{float(last['images_per_second']):.0f} |")
    first = next(iter(pretraining.values()))["knn"]
    if first.get("raw_pixel_accuracy") is not None:  # None: config evaluate.knn_raw_pixels was false
        lines.append(f"| raw pixels | — | — | — | {first['raw_pixel_accuracy']:.4f} | — | — | — |")
    return [*lines, *world_lines(pretraining)]


def world_lines(pretraining: dict) -> list:
    """Where each data-parallel pretraining run ran: its processes (world size) and their nodes, from the
    encoder's card (config compute.nodes, pretrain.processes); the kNN probe copies it for more than one."""
    worlds = [(label, run["knn"]["pretraining_world"]) for label, run in pretraining.items()
              if run["knn"].get("pretraining_world")]
    if not worlds:
        return []
    runs = "; ".join(f"{label}: {world['world_size']} process(es) on {len(world['nodes'])} node(s) "
                     f"({', '.join(world['nodes'])})" for label, world in worlds)
    return ["", f"Pretraining ran data-parallel as follows: {runs}."]


def claims_section(claims) -> list:
    """The claims table (results/claims.csv) as Markdown, with a count of each verdict."""
    if not claims:
        return []
    counts = defaultdict(int)
    for claim in claims:
        counts[claim["verdict"]] += 1
    lines = ["## Claims", "",
             f"{len(claims)} claims checked ({', '.join(f'{n} {v}' for v, n in sorted(counts.items()))}); "
             "means with two-sided 95 % t-intervals over independent runs (a pretraining run, its fine-tuning "
             "seeds averaged; or a scratch run), verdicts from one-sided tests at each claim's alpha, so a "
             "supported claim's interval may still touch 0. Every column is in [claims.csv](claims.csv).", "",
             "| " + " | ".join(CLAIM_COLUMNS) + " |", "|" + "---|" * len(CLAIM_COLUMNS)]
    for claim in claims:
        cells = [claim[column].replace("|", "/") for column in CLAIM_COLUMNS]
        cells[CLAIM_COLUMNS.index("verdict")] = f"**{claim['verdict']}**" + (
            f" (about {claim['seeds_needed']} seeds needed)" if claim.get("seeds_needed") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def collapse_notes(pretraining: dict) -> list:
    collapsed = [objective for objective, run in pretraining.items()
                 if str(run["curve"][-1].get("collapsed")) == "True"]
    if not collapsed:
        return []
    return ["", f"**Collapse:** {', '.join(collapsed)} mapped every image to nearly the same embedding by the "
            "last epoch (the standard deviation of its L2-normalised embeddings fell below a tenth of the "
            "1/sqrt(D) of embeddings spread over the sphere). Its accuracies above measure a broken encoder; "
            "the pretraining log says when it happened."]


def reference_table(references, stats, largest_fraction, methods, parameters) -> list:
    lines = ["| model | parameters | test accuracy | source |", "|---|---:|---:|---|"]
    for method in methods:
        cell = stats.get((method, largest_fraction))
        if cell:
            lines.append(f"| **ours**, {method}, {100 * largest_fraction:g}% labels | {parameters:,} | "
                         f"**{mean_std(cell)}** | this run |")
    for ref in references:
        lines.append(f"| {ref['model']} | {ref.get('parameters', '—')} | {ref['test_accuracy']:.3f} | "
                     f"{ref['source']} |")
    return lines


def build_report(run_metrics, finetune_curves, pretraining, card, settings, out_dir, claims=None) -> dict:
    """Write summary.csv, label_efficiency.csv, metrics.json, report.md and plots/*.png under `out_dir`.
    pretraining: one {"curve": its curve rows, "knn": its kNN probe, "linear": its linear probe} per
    pretraining run; claims: the rows of claims.csv, or None; settings: config `report`."""
    out_dir = Path(out_dir)
    pretraining = pretraining_runs(pretraining)
    rows = summary_rows(run_metrics)
    write_summary(out_dir / "summary.csv", rows)
    stats = aggregate(run_metrics)
    write_label_efficiency(out_dir / "label_efficiency.csv", out_dir / "tables" / "label_efficiency.html", stats)
    fractions = sorted({row["label_fraction"] for row in rows})
    present = {method_of(row) for row in run_metrics}
    pretrained = list(dict.fromkeys(run["method"] for run in pretraining.values()))
    methods = [method for method in pretrained if method in present] + sorted(present - set(pretrained))
    largest = fractions[-1]
    seeds = sorted({row["seed"] for row in rows})

    plot_label_efficiency(out_dir / "plots" / "label_efficiency.png", stats, fractions, methods)
    plot_training_curves(out_dir / "plots" / "training_curves.png", pretraining, finetune_curves,
                         [*pretrained, SCRATCH])
    matrices = {}
    for method in methods:
        runs = [m for m in run_metrics if method_of(m) == method and m["label_fraction"] == largest]
        summed = [[sum(m["confusion_matrix"][i][j] for m in runs) for j in range(card["num_classes"])]
                  for i in range(card["num_classes"])]
        matrices[f"{method}, {100 * largest:g}% labels, {len(runs)} seeds summed"] = summed
    plot_confusion_matrices(out_dir / "plots" / "confusion_matrix.png", matrices, card["class_names"])

    mode = run_metrics[0]["mode"]
    n_pretrain = len({run["knn"].get("pretrain_seed", 0) for run in pretraining.values()})
    knn = next(iter(pretraining.values()))["knn"]
    lines = [
        f"# {settings['title']}",
        "",
        *claims_section(claims),
        f"Dataset **{card['dataset']}**: {card['splits']['train']['count']} training, "
        f"{card['splits']['val']['count']} validation and {card['splits']['test']['count']} test images of "
        f"shape {tuple(card['image_shape'])}, {card['num_classes']} classes. Fine-tuning mode **{mode}**, "
        f"seeds {seeds}. Every number below is a test-set accuracy; the validation split only picks the "
        "checkpoint. All runs are listed in [summary.csv](summary.csv).",
        "",
        "## Label efficiency",
        "",
        f"Test accuracy, mean ± sample standard deviation over {len(seeds)} fine-tuning seeds"
        + (f" and {n_pretrain} pretraining seeds" if n_pretrain > 1 else "") + "; with 95 % confidence "
        "intervals in [label_efficiency.csv](label_efficiency.csv).",
        "",
        *label_efficiency_table(stats, fractions, methods),
        "",
        "![label-efficiency curve](plots/label_efficiency.png)",
        "",
        "## Self-supervised encoders: kNN and linear probes, and cost",
        "",
        "Linear probe: a multinomial logistic regression fitted to convergence (whitened features, L-BFGS; a fit "
        "that stopped at its iteration cap is marked **not converged**) on the frozen "
        "encoder's standardised features of the labeled training images, test accuracy (SimCLR's linear "
        f"evaluation). Weighted kNN (k={knn['k']}, cosine similarity, temperature {knn['temperature']}) on the test set, "
        f"with the {knn['memory_bank_size']} labeled training images as memory bank. Embedding std: the "
        "per-dimension standard deviation of the objective's L2-normalised embeddings, averaged, in the last "
        "epoch (0 is collapse). Pretraining time is training only, without start-up.",
        "",
        *pretraining_table(pretraining),
        *collapse_notes(pretraining),
        "",
        "## Beside published results",
        "",
        *reference_table(settings["references"], stats, largest, methods, run_metrics[0]["parameters"]),
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
