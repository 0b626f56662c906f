# Config validation, paths and the helpers the rules share.
import json
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from ssl_pipeline.config import validate_config
from ssl_pipeline.settings import rule_settings

validate_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")

# The package runs from this checkout, also inside a per-rule conda env where it is not installed.
# shell.prefix replaces Snakemake's default strict mode, so it is repeated here; the prefix is
# formatted like a command, hence the doubled braces of the shell expansion.
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(workflow.basedir)
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)

RESULTS = "results"
RAW = f"{RESULTS}/raw"
DATA = f"{RESULTS}/data"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
# Resume state of training jobs: not an output, so it survives a failed job (ssl_pipeline/resume.py).
RESUME = f"{RESULTS}/resume"
SPLITS = ("train", "val", "test")


def split_files(*splits):
    return [f"{DATA}/{split}_{kind}.npy" for split in splits for kind in ("images", "labels")]


ENCODER = f"{RESULTS}/pretrain/encoder.pt"
RUN = "{init}/fraction{fraction}/seed{seed}"


wildcard_constraints:
    init="pretrained|scratch",
    fraction=r"[0-9.e-]+",
    seed=r"\d+",


def settings_of(rule_name):
    """JSON of the config keys `rule_name` reads (ssl_pipeline/settings.py): a param, so changing one
    of them reruns the rule's jobs, and only those."""
    return json.dumps(rule_settings(config, rule_name), sort_keys=True)


def resume_resources():
    """config compute's resume keys, as resources: unlike params, editing them reruns no finished job."""
    compute = config["compute"]
    return {
        "checkpoint_every": str(compute["checkpoint_every"]),
        "stop_margin_seconds": compute["stop_margin_seconds"],
        "resume": compute["resume"],
    }


def fraction_name(fraction):
    """The spelling of a label fraction in paths: 0.01 -> '0.01', 1.0 -> '1'."""
    return f"{fraction:g}"


def run_paths(pattern):
    """`pattern` filled in for every (init, label fraction, seed) of the config."""
    return expand(
        pattern,
        init=config["finetune"]["inits"],
        fraction=[fraction_name(f) for f in config["finetune"]["label_fractions"]],
        seed=config["finetune"]["seeds"],
    )


def directory_of(name):
    """A params function giving the directory of the named input or output file."""

    def directory(wildcards, input, output):
        files = {**dict(input.items()), **dict(output.items())}
        return os.path.dirname(files[name])

    return directory


def pretrained_encoder(wildcards):
    return ENCODER if wildcards.init == "pretrained" else []


def encoder_option(wildcards, input):
    return f"--encoder {input.encoder}" if input.encoder else ""


def report_outputs():
    return [
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/report.md",
        f"{RESULTS}/plots/label_efficiency.png",
        f"{RESULTS}/plots/training_curves.png",
        f"{RESULTS}/plots/confusion_matrix.png",
    ]
