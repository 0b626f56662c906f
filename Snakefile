# Self-supervised pretraining and label efficiency, from raw data to report.
# Table of contents: each stage's rules live in workflow/rules/<stage>.smk.
from snakemake.utils import min_version

min_version("9.0")


# No configfile: the config is config/config.yaml's defaults, the experiments named by key experiment, then
# the keys given by --configfile / --config or a deploying project (workflow/rules/common.smk).


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Fetching data and writing the report run where Snakemake runs (a cluster's login node), not as jobs.
localrules:
    download,
    report,
    claims,


rule all:
    default_target: True
    input:
        report_outputs(),
