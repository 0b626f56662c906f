# Preprocessing in shards (config preprocess.shard_images): the plan reads only the labels, then one job per
# shard decodes its images (in parallel, locally or as Slurm jobs), then one job writes each split's index
# file over its shards, the normalisation and the card (ssl_pipeline/stages/preprocess_shards.py).
SHARD_PLAN = f"{DATA}/shards/plan.json"


checkpoint preprocess_plan:
    input:
        # As for rule preprocess: the raw files are verified by their sha256, their mtime means nothing.
        ancient(rules.download.output),
    output:
        [f"{DATA}/{split}_labels.npy" for split in SPLITS],
        plan=SHARD_PLAN,
        positions=f"{DATA}/shards/positions.npz",
    log:
        f"{LOGS}/preprocess_plan.log",
    conda:
        "../../envs/preprocess_plan.yaml"
    threads: 1
    resources:
        mem_mb=2048,
    params:
        settings=settings_of("preprocess_plan"),
        raw_dir=lambda wildcards, input: os.path.dirname(input[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m ssl_pipeline preprocess-plan --raw-dir {params.raw_dir}"
        " --settings {params.settings:q} --out-dir {params.out_dir} > {log} 2>&1"


rule preprocess_shard:
    input:
        raw=ancient(rules.download.output),
        plan=SHARD_PLAN,
        positions=f"{DATA}/shards/positions.npz",
    output:
        images=f"{DATA}/shards/{{split}}_images/{{shard}}.npy",
        stats=f"{DATA}/shards/{{split}}_images/{{shard}}.json",
    log:
        f"{LOGS}/preprocess_shard/{{split}}/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/preprocess_shard/{{split}}/{{shard}}.tsv"
    wildcard_constraints:
        split="train|val|test|unlabeled",
        shard=r"\d+",
    conda:
        "../../envs/preprocess_shard.yaml"
    threads: 1
    resources:
        mem_mb=4096,
    params:
        settings=settings_of("preprocess_shard"),
        raw_dir=lambda wildcards, input: os.path.dirname(input[0]),
        data_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input.plan)),
    shell:
        "python -m ssl_pipeline preprocess-shard --raw-dir {params.raw_dir} --settings {params.settings:q}"
        " --data-dir {params.data_dir} --split {wildcards.split} --shard {wildcards.shard} > {log} 2>&1"


rule preprocess_index:
    input:
        plan=SHARD_PLAN,
        shards=planned_shards,
    output:
        [split_images(split) for split in (*SPLITS, "unlabeled")],
        normalization=f"{DATA}/normalization.json",
        card=f"{DATA}/card.json",
    log:
        f"{LOGS}/preprocess_index.log",
    conda:
        "../../envs/preprocess_index.yaml"
    threads: 1
    resources:
        mem_mb=1024,
    params:
        data_dir=directory_of("card"),
    shell:
        "python -m ssl_pipeline preprocess-index --data-dir {params.data_dir} > {log} 2>&1"
