"""Self-supervised pretraining and label-efficiency pipeline: the logic behind every Snakemake rule.

Each stage is a module with plain functions; `python -m ssl_pipeline <stage>` is the thin entry the
rules call. Modules import only what their stage needs, so each rule's conda env stays small.
"""
