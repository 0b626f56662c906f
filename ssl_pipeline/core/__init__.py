"""The machinery the stages share: config and its keys (config, config_keys, settings, sweeps), files
(artifacts, raw_files, data), models and training (models, training, resume, runtime, distributed,
inference, roofline), tables (results_table, html_table), and stage_code (the code each stage runs)."""
