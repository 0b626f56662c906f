# The raw files of config dataset (the four IDX files, or one archive) and of dataset.unlabeled, if any.
# Partial files live in results/resume/download/, not among the outputs: Snakemake deletes the outputs of a
# failed or killed job, and the next run continues the partial files with HTTP Range requests.
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
        # A resource, not a param: editing the log's progress interval reruns no download.
        progress_seconds=str(config["download"]["progress_seconds"]),
    params:
        settings=settings_of("download"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        partial_dir=f"{RESUME}/download",
    shell:
        "python -m ssl_pipeline download --settings {params.settings:q} --out-dir {params.out_dir}"
        " --partial-dir {params.partial_dir} --progress-seconds {resources.progress_seconds} > {log} 2>&1"
