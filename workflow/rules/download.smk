rule download:
    output:
        **{role: f"{RAW}/{spec['name']}" for role, spec in config["dataset"]["files"].items()},
    params:
        settings=settings_of("download"),
        out_dir=directory_of("train_images"),
    log:
        f"{LOGS}/download.log",
    threads: 1
    resources:
        mem_mb=512,
    conda:
        "../../envs/download.yaml"
    shell:
        "python -m ssl_pipeline download --settings {params.settings:q} --out-dir {params.out_dir}"
        " > {log} 2>&1"
