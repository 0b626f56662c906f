rule download:
    output:
        **{role: f"{RAW}/{spec['name']}" for role, spec in config["dataset"]["files"].items()},
    params:
        files=as_json(config["dataset"]["files"]),
        mirrors=as_json(config["dataset"]["mirrors"]),
        retry=as_json(config["download"]),
        out_dir=directory_of("train_images"),
    log:
        f"{LOGS}/download.log",
    threads: 1
    resources:
        mem_mb=512,
    conda:
        "../../envs/download.yaml"
    shell:
        "python -m ssl_pipeline download --files {params.files:q} --mirrors {params.mirrors:q}"
        " --retry {params.retry:q} --out-dir {params.out_dir} > {log} 2>&1"
