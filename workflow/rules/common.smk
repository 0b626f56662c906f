# Config validation, paths and the helpers the rules share.
import json
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from ssl_pipeline.config import validate_config
from ssl_pipeline.raw_files import all_raw_paths
from ssl_pipeline.settings import OBJECTIVE_SECTIONS, rule_settings

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


OBJECTIVES = config["pretrain"]["objectives"]
# Per pretraining objective.
ENCODER = f"{RESULTS}/pretrain/{{objective}}/encoder.pt"
# A fine-tuning run: its init is the objective whose encoder it starts from, or scratch.
RUN = "{init}/fraction{fraction}/seed{seed}"


wildcard_constraints:
    objective="|".join(OBJECTIVE_SECTIONS),
    init="|".join(["scratch", *OBJECTIVE_SECTIONS]),
    fraction=r"[0-9.e-]+",
    seed=r"\d+",


def settings_of(rule_name):
    """JSON of the config keys `rule_name` reads (ssl_pipeline/settings.py): a param, so changing one
    of them reruns the rule's jobs, and only those. Jobs of one objective read its section only."""

    def settings(wildcards):
        objective = wildcards.get("objective")
        return json.dumps(rule_settings(config, rule_name, objective), sort_keys=True)

    return settings


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


def run_inits():
    """The init wildcard's values: each objective for init 'pretrained', and 'scratch'."""
    inits = config["finetune"]["inits"]
    return (OBJECTIVES if "pretrained" in inits else []) + (["scratch"] if "scratch" in inits else [])


def run_paths(pattern):
    """`pattern` filled in for every (init, label fraction, seed) of the config."""
    return expand(
        pattern,
        init=run_inits(),
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
    return [] if wildcards.init == "scratch" else ENCODER.format(objective=wildcards.init)


def encoder_option(wildcards, input):
    """--init and, from a pretrained encoder, --encoder."""
    if wildcards.init == "scratch":
        return "--init scratch"
    return f"--init pretrained --encoder {input.encoder}"


def per_objective(pattern):
    """`pattern` filled in for every pretraining objective."""
    return expand(pattern, objective=OBJECTIVES)


def report_outputs():
    return [
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/report.md",
        f"{RESULTS}/plots/label_efficiency.png",
        f"{RESULTS}/plots/training_curves.png",
        f"{RESULTS}/plots/confusion_matrix.png",
    ]
