# The raw files of config dataset (the four IDX files, or one archive) and of dataset.unlabeled, if any.
rule download:
    output:
        all_raw_paths(config["dataset"], RAW),
    log:
        f"{LOGS}/download.log",
    conda:
        "../../envs/download.yaml"
    threads: 1
    resources:
        mem_mb=512,
    params:
        settings=settings_of("download"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m ssl_pipeline download --settings {params.settings:q} --out-dir {params.out_dir}" " > {log} 2>&1"
