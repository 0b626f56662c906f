# One job per pretraining run: objective (config pretrain.objectives) x sweep variant (config sweeps) x
# pretraining seed (config pretrain.seeds).
# Reads the training images, the unlabeled ones (config dataset.unlabeled; none by default) and their
# statistics only: never a label file. Given more than one GPU
# (e.g. --set-resources pretrain:gpu=4), it runs one data-parallel process per GPU (config
# pretrain.processes). With config compute.nodes > 1 it is one Slurm job over that many nodes, one srun task
# per process (ssl_pipeline/core/multinode.py), with one log per rank beside the job's log.
rule pretrain:
    input:
        images=split_images("train"),
        unlabeled=split_images("unlabeled"),
        normalization=f"{DATA}/normalization.json",
    output:
        checkpoint=ENCODER,
        curve=f"{RESULTS}/pretrain/{PRETRAINING}/curve.csv",
    log:
        f"{LOGS}/pretrain/{PRETRAINING}.log",
    benchmark:
        f"{BENCHMARKS}/pretrain/{PRETRAINING}.tsv"
    conda:
        "../../envs/pretrain.yaml"
    threads: config["compute"]["threads"]
    resources:
        **resume_resources(),
        **data_resources(),
        **pretrain_resources(),
        mem_mb=4096,
        runtime=120,
    params:
        settings=settings_of("pretrain"),
        resume_file=f"{RESUME}/pretrain/{PRETRAINING}.pt",
        rank_logs=f"{LOGS}/pretrain/{PRETRAINING}",
        launcher=lambda wildcards, resources: resources.get("mpi", "srun"),
    shell:
        "python -m ssl_pipeline pretrain --train-images {input.images} --unlabeled-images {input.unlabeled}"
        " --normalization {input.normalization} --settings {params.settings:q} --threads {threads}"
        " --gpus {resources.gpu} --resume-file {params.resume_file}"
        " --checkpoint-every {resources.checkpoint_every} --resume {resources.resume}"
        " --stop-margin-seconds {resources.stop_margin_seconds}"
        " --rank-timeout-seconds {resources.rank_timeout_seconds} --rank-logs {params.rank_logs}"
        " --launcher {params.launcher}"
        " --residency {resources.residency} --memory-limit {resources.memory_limit}"
        " --checkpoint {output.checkpoint} --curve {output.curve} > {log} 2>&1"
