"""Commands beside the DAG, each `python -m ssl_pipeline.tools.<name>` (the Makefile's targets): versioning
(DVC: dvc-yaml, record, push, pull), gpu_check and gpu_bundle (the GPU check, also on an offline node),
config_reference (docs/configuration.md from the schema)."""
