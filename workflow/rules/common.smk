# Config validation, paths and the helpers the rules share.
import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError

# This workflow's checkout: workflow.basedir is the deploying project's when it runs as a module.
ROOT = os.path.dirname(os.path.dirname(str(workflow.current_basedir)))
if not os.path.isfile(os.path.join(ROOT, "ssl_pipeline", "__main__.py")):
    raise WorkflowError(
        f"this workflow runs from a local checkout (its rules call its Python package), not from {ROOT}: "
        "clone the release (git clone --branch <tag> ...) and point the module's snakefile: at its Snakefile"
    )
sys.path.insert(0, ROOT)
from ssl_pipeline.core.config import complete_config, validate_config
from ssl_pipeline.core.raw_files import all_raw_paths
from ssl_pipeline.core.settings import OBJECTIVE_SECTIONS, rule_settings
from ssl_pipeline.core.sweeps import applies_to, pretraining_variants, run_name, sweep_variants, variant_config

# config holds the keys given (--configfile, --config, or a deploying project's config/config.yaml): they go
# over the defaults and the experiments they name (key experiment), in place, since modules share the dict.
_given = dict(config)
config.clear()
config.update(complete_config(_given, f"{ROOT}/config/config.yaml"))
validate_config(config, f"{ROOT}/workflow/schemas/config.schema.yaml")

# The package runs from this checkout, also inside a per-rule conda env where it is not installed.
# shell.prefix replaces Snakemake's default strict mode, so it is repeated here; the prefix is
# formatted like a command, hence the doubled braces of the shell expansion.
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(ROOT)}" "${{PYTHONPATH:+:$PYTHONPATH}}; ")

RESULTS = "results"
RAW = f"{RESULTS}/raw"
DATA = f"{RESULTS}/data"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
# Resume state of training jobs: not an output, so it survives a failed job (ssl_pipeline/core/resume.py).
RESUME = f"{RESULTS}/resume"
SPLITS = ("train", "val", "test")


# config preprocess.shard_images: preprocessing runs as one job per shard (workflow/rules/preprocess_shards.smk),
# and each split's images are an index file over its shards (ssl_pipeline/core/arrays.py reads either).
SHARDED = config["preprocess"]["shard_images"] is not None


def split_images(split):
    """A split's images: <split>_images.npy, or <split>_images.index.json when preprocessing runs in shards."""
    return f"{DATA}/{split}_images.{'index.json' if SHARDED else 'npy'}"


def split_files(*splits):
    return [path for split in splits for path in (split_images(split), f"{DATA}/{split}_labels.npy")]


def planned_shards(wildcards):
    """preprocess_index's input: every shard and its statistics file (shard_file() and stats_file() in
    ssl_pipeline/stages/preprocess_shards.py), as the plan names them: known once the plan job has run."""
    with open(checkpoints.preprocess_plan.get().output.plan) as handle:
        splits = json.load(handle)["splits"]
    return [
        f"{DATA}/{name}"
        for entry in splits.values()
        for path in entry["files"]
        for name in (path, path.removesuffix(".npy") + ".json")
    ]


OBJECTIVES = config["pretrain"]["objectives"]
# The identity of a pretraining run, one path scheme for every stage that follows it: objective, sweep
# variant (ssl_pipeline/core/sweeps.py; "base" without a sweep) and pretraining seed.
PRETRAINING = "{objective}/{variant}/seed{pretrain_seed}"
ENCODER = f"{RESULTS}/pretrain/{PRETRAINING}/encoder.pt"
# A fine-tuning run: its init is the pretraining run whose encoder it starts from, or scratch.
RUN = "{init}/fraction{fraction}/seed{seed}"
OBJECTIVE_PATTERN = "|".join(OBJECTIVE_SECTIONS)


wildcard_constraints:
    objective=OBJECTIVE_PATTERN,
    variant=r"[^/]+",
    pretrain_seed=r"\d+",
    init=rf"scratch|(?:{OBJECTIVE_PATTERN})/[^/]+/seed\d+",
    fraction=r"[0-9.e-]+",
    seed=r"\d+",


def settings_of(rule_name):
    """JSON of the config keys `rule_name` reads (ssl_pipeline/core/settings.py): a param, so changing one
    of them reruns the rule's jobs, and only those. Jobs of one objective read its section only."""

    def settings(wildcards):
        objective = wildcards.get("objective")
        variant = wildcards.get("variant")  # `in` would test the values of Snakemake's Wildcards, not names
        pretraining = {"variant": variant, "seed": wildcards.pretrain_seed} if variant else None
        return json.dumps(rule_settings(config, rule_name, objective, pretraining), sort_keys=True)

    return settings


def resume_resources():
    """config compute's resume keys, as resources: unlike params, editing them reruns no finished job."""
    compute = config["compute"]
    return {
        "checkpoint_every": str(compute["checkpoint_every"]),
        "stop_margin_seconds": compute["stop_margin_seconds"],
        "resume": compute["resume"],
        "rank_timeout_seconds": compute["rank_timeout_seconds"],
    }


# Executors that can spread a job over several nodes: the slurm executor, and the pseudo-executors of a dry
# run, which run nothing.
MULTI_NODE_EXECUTORS = {"slurm", "dryrun", "touch"}


def pretrain_resources():
    """config compute.nodes as the pretraining job's resources. One node: a GPU (the local scheduler and
    the slurm executor's --gpus). Several: the slurm executor's `mpi` kind of job, `nodes` nodes with
    pretrain.processes tasks each (one per node when 'auto'; `tasks_per_gpu=0` keeps the plugin from
    turning them into --ntasks-per-gpu), their GPUs as gres per node, and each task's share of the
    job's threads; the package then starts the ranks with srun (ssl_pipeline/core/multinode.py)."""
    compute = config["compute"]
    nodes = compute["nodes"]
    if nodes == 1:
        return {"gpu": 1}

    def per_node(wildcards):
        # A sweep may set pretrain.processes per variant (compute.nodes is the same for all).
        processes = variant_config(config, wildcards.variant)["pretrain"]["processes"]
        return 1 if processes == "auto" else processes

    def checked_nodes(wildcards):
        # Known only once Snakemake runs, not while it reads the Snakefile. A job already inside a Slurm
        # allocation (the executor's job on its first node) is where it should be.
        executor = workflow.executor_plugin.name if workflow.executor_plugin else None
        if executor not in MULTI_NODE_EXECUTORS and "SLURM_JOB_ID" not in os.environ:
            raise WorkflowError(
                f"config key compute.nodes is {nodes}: pretraining on several nodes runs as a Slurm job through "
                f"the slurm executor (--workflow-profile profiles/slurm), not the {executor} executor; set "
                'compute.nodes: 1 to run here (docs/clusters.md, "More than one node")'
            )
        return nodes

    resources = {
        "nodes": checked_nodes,
        "tasks": lambda wildcards: nodes * per_node(wildcards),
        "mpi": "srun",
        "tasks_per_gpu": 0,
        "gpu": 0,
        "cpus_per_task": lambda wildcards, threads: max(1, threads // per_node(wildcards)),
        # The plugin's --ntasks alone lets Slurm spread the tasks unevenly; the launcher's srun wants K per node.
        "slurm_extra": lambda wildcards: f"--ntasks-per-node={per_node(wildcards)}",
    }
    if compute["device"] != "cpu":
        resources["gres"] = lambda wildcards: f"gpu:{per_node(wildcards)}"
    return resources


def data_resources():
    """config data's residency keys, as resources: the batches are the same wherever the images live, so
    editing them reruns no finished job (ssl_pipeline/core/residency.py)."""
    data = config["data"]
    return {
        "residency": data["residency"],
        "memory_limit": "none" if data["memory_limit"] is None else str(data["memory_limit"]),
    }


def fraction_name(fraction):
    """The spelling of a label fraction in paths: 0.01 -> '0.01', 1.0 -> '1'."""
    return f"{fraction:g}"


def pretraining_runs(variants=None):
    """Every pretraining run of the config: objective x variant x pretraining seed, as PRETRAINING paths."""
    variants = pretraining_variants(config) if variants is None else variants
    return [
        PRETRAINING.format(objective=objective, variant=variant, pretrain_seed=seed)
        for objective in OBJECTIVES
        for variant in variants
        if applies_to(config, variant, objective)
        for seed in config["pretrain"]["seeds"]
    ]


def finetuned_variants():
    """The variants fine-tuning starts from: config finetune.variants, or every variant (null)."""
    chosen = config["finetune"]["variants"]
    if chosen is None:
        return pretraining_variants(config)
    return list(dict.fromkeys(run_name(config, variant) for variant in chosen))


def run_inits():
    """The init wildcard's values: each fine-tuned pretraining run for init 'pretrained', and 'scratch'."""
    inits = config["finetune"]["inits"]
    pretrained = pretraining_runs(finetuned_variants()) if "pretrained" in inits else []
    return pretrained + (["scratch"] if "scratch" in inits else [])


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
    return [] if wildcards.init == "scratch" else f"{RESULTS}/pretrain/{wildcards.init}/encoder.pt"


def encoder_option(wildcards, input):
    """--init and, from a pretrained encoder, --encoder."""
    if wildcards.init == "scratch":
        return "--init scratch"
    return f"--init pretrained --encoder {input.encoder}"


def per_pretraining(pattern):
    """`pattern` (with {pretraining} in it) filled in for every pretraining run."""
    return [pattern.format(pretraining=run) for run in pretraining_runs()]


def claims_table():
    """results/claims.csv when config claims.files lists claim files, else nothing."""
    return [f"{RESULTS}/claims.csv", f"{RESULTS}/tables/claims.html"] if config["claims"]["files"] else []


def report_outputs():
    return [
        *claims_table(),
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/label_efficiency.csv",
        f"{RESULTS}/tables/label_efficiency.html",
        f"{RESULTS}/report.md",
        f"{RESULTS}/plots/label_efficiency.png",
        f"{RESULTS}/plots/training_curves.png",
        f"{RESULTS}/plots/confusion_matrix.png",
    ]
