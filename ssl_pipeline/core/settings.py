"""Which config keys each rule reads.

One table serves two readers: the Snakemake rules pass a rule's keys as its `params` (so Snakemake
reruns a job when a key it reads changes), and the dvc.yaml generator lists the same keys, one by one,
as the stage's `params` (so `dvc exp run -S key=value` reruns exactly the stages that read the key).
"""
from ssl_pipeline.core.config_keys import (NOT_JOB_SETTINGS, OBJECTIVE_SECTIONS, ONE_RULE_KEYS, RESUME_KEYS, has_key,
                                          lookup, other_objectives)
from ssl_pipeline.core.sweeps import variant_config

__all__ = ["NOT_JOB_SETTINGS", "OBJECTIVE_SECTIONS", "RESUME_KEYS", "RULE_CONFIG_KEYS", "has_key", "leaf_keys",
           "lookup", "other_objectives", "rule_leaf_keys", "rule_settings"]

RULE_CONFIG_KEYS = {
    "download": ["dataset.format", "dataset.files", "dataset.archive", "dataset.imagenet.val_archive",
                 "dataset.imagenet.val_labels", "dataset.imagenet.synsets", "dataset.mirrors", "dataset.unlabeled",
                 "download"],
    "preprocess": ["dataset.name", "dataset.format", "dataset.files", "dataset.archive", "dataset.class_names",
                   "dataset.image_folder", "dataset.cifar_binary", "dataset.imagenet", "dataset.unlabeled",
                   "data.validation_fraction", "data.split_seed", "preprocess"],
    # Preprocessing in shards (config preprocess.shard_images): the plan reads what preprocess reads, a shard
    # job the format's keys (its images' positions come from the plan); the index job reads the plan only.
    "preprocess_shard": ["dataset.format", "dataset.files", "dataset.archive", "dataset.image_folder",
                         "dataset.cifar_binary", "dataset.imagenet", "dataset.unlabeled"],
    "preprocess_index": [],
    "label_subset": [],
    "pretrain": ["pretrain", "model", "compute"],
    "finetune": ["finetune", "model", "compute"],
    "evaluate": ["compute"],
    "knn_probe": ["evaluate.knn_k", "evaluate.knn_temperature", "evaluate.knn_raw_pixels", "compute"],
    "linear_probe": ["evaluate.linear_probe", "compute"],
    "report": ["report"],
    "claims": ["claims"],
}
RULE_CONFIG_KEYS["preprocess_plan"] = RULE_CONFIG_KEYS["preprocess"]

def leaf_keys(config: dict, prefix: str) -> list:
    """Dotted keys of every leaf under `prefix` (lists are leaves), minus NOT_JOB_SETTINGS."""
    value = lookup(config, prefix)
    if not isinstance(value, dict):
        return [] if prefix in NOT_JOB_SETTINGS else [prefix]
    return [leaf for key in value for leaf in leaf_keys(config, f"{prefix}.{key}")]


def rule_leaf_keys(config: dict, rule: str, objective: str = None) -> list:
    """The keys `rule` reads; for a job of one objective (wildcard `objective`) only that objective's
    section of pretrain, for jobs of no objective none of them."""
    return [leaf for prefix in RULE_CONFIG_KEYS[rule] for leaf in leaf_keys(config, prefix)
            if not other_objectives(leaf, objective) and ONE_RULE_KEYS.get(leaf, rule) == rule]


def rule_settings(config: dict, rule: str, objective: str = None, pretraining: dict = None) -> dict:
    """The part of `config` that `rule` reads, nested as in the config: {"pretrain": {...}, ...}.
    A job of one objective also gets its name as pretrain.objective; a pretraining job (`pretraining`:
    {"variant", "seed"}; by default the base config and the first seed) its variant's name and seed too,
    after the variant's overrides."""
    settings = {"pretrain": {"objective": objective}} if objective else {}
    if objective and rule == "pretrain":
        pretraining = pretraining or {"variant": "base", "seed": config["pretrain"]["seeds"][0]}
        config = variant_config(config, pretraining["variant"])
        settings["pretrain"].update(variant=pretraining["variant"], seed=int(pretraining["seed"]))
    for key in rule_leaf_keys(config, rule, objective):
        *parents, name = key.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = lookup(config, key)
    return settings
