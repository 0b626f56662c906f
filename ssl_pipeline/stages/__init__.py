"""The pipeline's stages: what each Snakemake rule runs, through `python -m ssl_pipeline <stage>`.

download (rule download), preprocess (preprocess, label_subset), pretrain, finetune, evaluate (evaluate,
knn_probe, linear_probe), report. The claims rule's stage is the claims family (ssl_pipeline/claims/).
Each imports only what it needs, so each rule's conda env stays small (ssl_pipeline/core/stage_code.py).
"""
