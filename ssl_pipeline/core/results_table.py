"""Every run's metrics as pandas tables, one row per run: what the report and the claims both read.

A fine-tuning run's `method` is the pretraining run's objective, with its sweep variant unless that is
the base config ("simclr", "simclr temperature~0.1"), or "scratch". Pretraining seeds and fine-tuning
seeds are both seeds of the pipeline: the statistics of a method pool them.
"""
import pandas as pd

SCRATCH = "scratch"
BASE = "base"  # ssl_pipeline.core.sweeps.BASE, not imported: that module needs Snakemake, the report's env has none
RUN_COLUMNS = ["init", "objective", "variant", "pretrain_seed", "label_fraction", "seed", "accuracy", "labeled_images"]


def method_name(objective, variant) -> str:
    if objective is None or (isinstance(objective, float) and pd.isna(objective)):
        return SCRATCH
    return objective if variant in (None, BASE) or pd.isna(variant) else f"{objective} {variant}"


def runs_frame(run_metrics: list) -> pd.DataFrame:
    """One row per fine-tuning run: init, objective, variant, pretrain_seed, label_fraction, seed,
    test_accuracy, ... and its method."""
    frame = pd.DataFrame([{key: value for key, value in metrics.items()
                           if key not in ("per_class_accuracy", "confusion_matrix")} for metrics in run_metrics],
                         columns=None if run_metrics else RUN_COLUMNS)
    frame = frame.rename(columns={"accuracy": "test_accuracy"})
    scratch = frame["init"] == SCRATCH
    frame.loc[scratch, ["objective", "variant", "pretrain_seed"]] = None
    frame["method"] = [method_name(o, v) for o, v in zip(frame["objective"], frame["variant"])]
    return frame


def pretraining_frame(knn: list, linear: list) -> pd.DataFrame:
    """One row per pretraining run: objective, variant, pretrain_seed, knn_accuracy, linear_accuracy,
    raw_pixel_knn_accuracy and its method."""
    def identity(probe):
        return probe["objective"], probe.get("variant", BASE), probe.get("pretrain_seed", 0)

    by_run = {identity(probe): probe for probe in linear}
    if set(by_run) != {identity(probe) for probe in knn}:
        raise ValueError("the kNN and linear probes must cover the same pretraining runs")
    rows = [{"objective": k["objective"], "variant": identity(k)[1], "pretrain_seed": identity(k)[2],
             "knn_accuracy": k["encoder_accuracy"], "raw_pixel_knn_accuracy": k.get("raw_pixel_accuracy"),
             "linear_accuracy": by_run[identity(k)]["accuracy"], "linear_converged": by_run[identity(k)]["converged"]}
            for k in knn]
    frame = pd.DataFrame(rows)
    frame["method"] = [method_name(o, v) for o, v in zip(frame["objective"], frame["variant"])]
    return frame
