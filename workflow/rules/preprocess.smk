# One job writes every array (config preprocess.shard_images null), or one job per shard does.
if SHARDED:

    include: "preprocess_shards.smk"

else:

    rule preprocess:
        input:
            # The raw files are verified by their sha256 (a param here), so their mtime means nothing:
            # fetching them again from another mirror must not retrain everything downstream.
            ancient(rules.download.output),
        output:
            split_files(*SPLITS),
            unlabeled=split_images("unlabeled"),
            normalization=f"{DATA}/normalization.json",
            card=f"{DATA}/card.json",
        log:
            f"{LOGS}/preprocess.log",
        conda:
            "../../envs/preprocess.yaml"
        threads: 1
        resources:
            mem_mb=2048,
        params:
            settings=settings_of("preprocess"),
            raw_dir=lambda wildcards, input: os.path.dirname(input[0]),
            out_dir=directory_of("card"),
        shell:
            "python -m ssl_pipeline preprocess --raw-dir {params.raw_dir}"
            " --settings {params.settings:q} --out-dir {params.out_dir} > {log} 2>&1"


# One job per (seed, fraction): adding either to the config adds subsets and leaves existing ones alone.
rule label_subset:
    input:
        labels=f"{DATA}/train_labels.npy",
        card=f"{DATA}/card.json",
    output:
        subset=f"{DATA}/subsets/seed{{seed}}/fraction{{fraction}}.npy",
    log:
        f"{LOGS}/label_subset/seed{{seed}}_fraction{{fraction}}.log",
    conda:
        "../../envs/label_subset.yaml"
    threads: 1
    resources:
        mem_mb=512,
    shell:
        "python -m ssl_pipeline label-subset --labels {input.labels} --card {input.card}"
        " --fraction {wildcards.fraction} --seed {wildcards.seed} --out {output.subset} > {log} 2>&1"
