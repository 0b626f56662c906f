rule finetune:
    input:
        split_files("train", "val"),
        card=f"{DATA}/card.json",
        normalization=f"{DATA}/normalization.json",
        subset=f"{DATA}/subsets/seed{{seed}}/fraction{{fraction}}.npy",
        encoder=pretrained_encoder,
    output:
        model=f"{RESULTS}/finetune/{RUN}/model.pt",
        curve=f"{RESULTS}/finetune/{RUN}/curve.csv",
    log:
        f"{LOGS}/finetune/{RUN}.log",
    benchmark:
        f"{BENCHMARKS}/finetune/{RUN}.tsv"
    conda:
        "../../envs/finetune.yaml"
    threads: config["compute"]["threads"]
    resources:
        **resume_resources(),
        **data_resources(),
        gpu=1,
        mem_mb=4096,
        runtime=60,
    params:
        settings=settings_of("finetune"),
        data_dir=directory_of("card"),
        encoder=encoder_option,
        resume_file=f"{RESUME}/finetune/{RUN}.pt",
    shell:
        "python -m ssl_pipeline finetune --data-dir {params.data_dir} --subset {input.subset}"
        " {params.encoder} --fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --settings {params.settings:q}"
        " --threads {threads} --resume-file {params.resume_file}"
        " --checkpoint-every {resources.checkpoint_every} --resume {resources.resume}"
        " --stop-margin-seconds {resources.stop_margin_seconds}"
        " --residency {resources.residency} --memory-limit {resources.memory_limit}"
        " --model {output.model} --curve {output.curve} > {log} 2>&1"
