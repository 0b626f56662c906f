"""Dotted keys of the config: reading them, and which of them are not the settings of one job.

Shared by settings.py (which keys each rule reads) and sweeps.py (which keys a sweep may change); it
imports neither, so neither imports the other for these.
"""

# Keys that are not settings of one job: the run lists decide which jobs exist (they are wildcards),
# threads come from the scheduler, and the resume keys decide how a job survives interruptions, not
# what it computes (rules pass them as resources). Editing them must not rerun a job that exists.
# The rank timeout too: it decides how soon a job whose rank died fails, so that its retry resumes.
RESUME_KEYS = {"compute.checkpoint_every", "compute.stop_margin_seconds", "compute.resume",
               "compute.rank_timeout_seconds"}
# So are the pretraining seeds and the sweep's variants (ssl_pipeline/core/sweeps.py): a pretraining job gets
# its own seed and its variant's overrides.
# And where training keeps the arrays (config data.residency, data.memory_limit): the batches are the same
# wherever they live, so editing these reruns nothing; rules pass them as resources, like the resume keys.
DATA_RESIDENCY_KEYS = {"data.residency", "data.memory_limit"}
# And how often a download logs its progress: it changes no byte fetched (the download rule passes it as a
# resource), and rerunning the download would refetch every raw file and rerun the whole DAG.
DOWNLOAD_PROGRESS_KEYS = {"download.progress_seconds"}
# And `experiment`: what an experiment selects is already in the other keys (ssl_pipeline/core/config.py).
NOT_JOB_SETTINGS = {"finetune.label_fractions", "finetune.seeds", "finetune.inits", "finetune.variants",
                    "pretrain.objectives", "pretrain.seeds", "compute.threads", "experiment", *RESUME_KEYS,
                    *DATA_RESIDENCY_KEYS, *DOWNLOAD_PROGRESS_KEYS}
# Keys that one rule reads although they sit in a section that others read too: compute.nodes spreads
# pretraining over Slurm nodes (it sets the world size, so pretraining reruns, and with it what reads its
# encoder); the other stages run on one node whatever it says, so it is not a setting of theirs.
ONE_RULE_KEYS = {"compute.nodes": "pretrain"}
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


def other_objectives(key: str, objective) -> bool:
    """Whether `key` lies in the section of an objective other than `objective`."""
    parts = key.split(".")
    return parts[0] == "pretrain" and len(parts) > 2 and parts[1] in OBJECTIVE_SECTIONS and parts[1] != objective
