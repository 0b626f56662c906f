"""Which config keys each rule reads.

One table serves two readers: the Snakemake rules pass a rule's keys as its `params` (so Snakemake
reruns a job when a key it reads changes), and the dvc.yaml generator lists the same keys, one by one,
as the stage's `params` (so `dvc exp run -S key=value` reruns exactly the stages that read the key).
"""

RULE_CONFIG_KEYS = {
    "download": ["dataset.files", "dataset.mirrors", "download"],
    "preprocess": ["dataset.name", "dataset.files", "dataset.class_names", "data"],
    "label_subset": [],
    "pretrain": ["pretrain", "model", "compute"],
    "finetune": ["finetune", "model", "compute"],
    "evaluate": ["compute"],
    "knn_probe": ["evaluate", "compute"],
    "report": ["report"],
}

# Keys that are not settings of one job: the run lists decide which jobs exist (they are wildcards),
# threads come from the scheduler, and the resume keys decide how a job survives interruptions, not
# what it computes (rules pass them as resources). Editing them must not rerun a job that exists.
RESUME_KEYS = {"compute.checkpoint_every", "compute.stop_margin_seconds", "compute.resume"}
NOT_JOB_SETTINGS = {"finetune.label_fractions", "finetune.seeds", "finetune.inits", "compute.threads",
                    *RESUME_KEYS}


def lookup(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def has_key(config: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def leaf_keys(config: dict, prefix: str) -> list:
    """Dotted keys of every leaf under `prefix` (lists are leaves), minus NOT_JOB_SETTINGS."""
    value = lookup(config, prefix)
    if not isinstance(value, dict):
        return [] if prefix in NOT_JOB_SETTINGS else [prefix]
    return [leaf for key in value for leaf in leaf_keys(config, f"{prefix}.{key}")]


def rule_leaf_keys(config: dict, rule: str) -> list:
    return [leaf for prefix in RULE_CONFIG_KEYS[rule] for leaf in leaf_keys(config, prefix)]


def rule_settings(config: dict, rule: str) -> dict:
    """The part of `config` that `rule` reads, nested as in the config: {"pretrain": {...}, ...}."""
    settings = {}
    for key in rule_leaf_keys(config, rule):
        *parents, name = key.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = lookup(config, key)
    return settings
