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
    "knn_probe": ["evaluate.knn_k", "evaluate.knn_temperature", "compute"],
    "linear_probe": ["evaluate.linear_probe", "compute"],
    "report": ["report"],
    "claims": ["claims"],
}

# Keys that are not settings of one job: the run lists decide which jobs exist (they are wildcards),
# threads come from the scheduler, and the resume keys decide how a job survives interruptions, not
# what it computes (rules pass them as resources). Editing them must not rerun a job that exists.
RESUME_KEYS = {"compute.checkpoint_every", "compute.stop_margin_seconds", "compute.resume"}
# So are the pretraining seeds and the sweep's variants (ssl_pipeline/sweeps.py): a pretraining job gets
# its own seed and its variant's overrides.
# And `experiment`: what an experiment selects is already in the other keys (ssl_pipeline/config.py).
NOT_JOB_SETTINGS = {"finetune.label_fractions", "finetune.seeds", "finetune.inits", "finetune.variants",
                    "pretrain.objectives", "pretrain.seeds", "compute.threads", "experiment", *RESUME_KEYS}
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


def rule_settings(config: dict, rule: str, objective: str = None, pretraining: dict = None) -> dict:
    """The part of `config` that `rule` reads, nested as in the config: {"pretrain": {...}, ...}.
    A job of one objective also gets its name as pretrain.objective; a pretraining job (`pretraining`:
    {"variant", "seed"}; by default the base config and the first seed) its variant's name and seed too,
    after the variant's overrides."""
    settings = {"pretrain": {"objective": objective}} if objective else {}
    if objective and rule == "pretrain":
        pretraining = pretraining or {"variant": "base", "seed": config["pretrain"]["seeds"][0]}
        from ssl_pipeline.sweeps import variant_config

        config = variant_config(config, pretraining["variant"])
        settings["pretrain"].update(variant=pretraining["variant"], seed=int(pretraining["seed"]))
    for key in rule_leaf_keys(config, rule, objective):
        *parents, name = key.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = lookup(config, key)
    return settings
