"""Self-supervised pretraining and label-efficiency pipeline: the logic behind every Snakemake rule.

Each stage is a module with plain functions in stages/; `python -m ssl_pipeline <stage>` is the thin entry
the rules call. Modules import only what their stage needs, so each rule's conda env stays small. The
machinery the stages share is in core/, commands beside the DAG in tools/, and the families (datasets,
backbones, objectives, augment, claims, benchmark) each hold one module per member and a registry.
"""
