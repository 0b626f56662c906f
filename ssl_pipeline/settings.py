"""Which config keys each rule reads.

One table serves two readers: the Snakemake rules pass a rule's keys as its `params` (so Snakemake
reruns a job when a key it reads changes), and the dvc.yaml generator lists the same keys, one by one,
as the stage's `params` (so `dvc exp run -S key=value` reruns exactly the stages that read the key).
"""

RULE_CONFIG_KEYS = {
    "download": ["dataset.format", "dataset.files", "dataset.archive", "dataset.mirrors", "dataset.unlabeled",
                 "download"],
    "preprocess": ["dataset.name", "dataset.format", "dataset.files", "dataset.archive", "dataset.class_names",
                   "dataset.image_folder", "dataset.cifar_binary", "dataset.unlabeled", "data"],
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
NOT_JOB_SETTINGS = {"finetune.label_fractions", "finetune.seeds", "finetune.inits", "pretrain.objectives",
                    "compute.threads", *RESUME_KEYS}
# The objectives' config sections, pretrain.<name> (ssl_pipeline/objectives/). A pretraining job reads
# the section of its own objective only, so that editing one objective's settings reruns its jobs alone.
OBJECTIVE_SECTIONS = ("simclr", "byol", "vicreg", "barlow_twins", "moco_v2")


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


def other_objectives(key: str, objective) -> bool:
    """Whether `key` lies in the section of an objective other than `objective`."""
    parts = key.split(".")
    return parts[0] == "pretrain" and len(parts) > 2 and parts[1] in OBJECTIVE_SECTIONS and parts[1] != objective


def rule_leaf_keys(config: dict, rule: str, objective: str = None) -> list:
    """The keys `rule` reads; for a job of one objective (wildcard `objective`) only that objective's
    section of pretrain, for jobs of no objective none of them."""
    return [leaf for prefix in RULE_CONFIG_KEYS[rule] for leaf in leaf_keys(config, prefix)
            if not other_objectives(leaf, objective)]


def rule_settings(config: dict, rule: str, objective: str = None) -> dict:
    """The part of `config` that `rule` reads, nested as in the config: {"pretrain": {...}, ...}.
    A job of one objective also gets its name as pretrain.objective."""
    settings = {"pretrain": {"objective": objective}} if objective else {}
    for key in rule_leaf_keys(config, rule, objective):
        *parents, name = key.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = lookup(config, key)
    return settings
