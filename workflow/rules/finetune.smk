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
    params:
        settings=settings_of("finetune"),
        data_dir=directory_of("card"),
        encoder=encoder_option,
    log:
        f"{LOGS}/finetune/{RUN}.log",
    benchmark:
        f"{BENCHMARKS}/finetune/{RUN}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=1,
        mem_mb=4096,
        runtime=60,
    conda:
        "../../envs/finetune.yaml"
    shell:
        "python -m ssl_pipeline finetune --data-dir {params.data_dir} --subset {input.subset}"
        " {params.encoder} --init {wildcards.init} --fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --settings {params.settings:q}"
        " --threads {threads} --model {output.model} --curve {output.curve} > {log} 2>&1"
