rule evaluate:
    input:
        model=f"{RESULTS}/finetune/{RUN}/model.pt",
        images=split_images("test"),
        labels=f"{DATA}/test_labels.npy",
        normalization=f"{DATA}/normalization.json",
    output:
        metrics=f"{RESULTS}/evaluate/{RUN}/metrics.json",
    log:
        f"{LOGS}/evaluate/{RUN}.log",
    conda:
        "../../envs/evaluate.yaml"
    threads: 1
    resources:
        **data_resources(),
        mem_mb=2048,
    params:
        settings=settings_of("evaluate"),
        data_dir=directory_of("normalization"),
    shell:
        "python -m ssl_pipeline evaluate --data-dir {params.data_dir} --model {input.model}"
        " --settings {params.settings:q} --threads {threads}"
        " --residency {resources.residency} --memory-limit {resources.memory_limit}"
        " --metrics {output.metrics} > {log} 2>&1"


rule knn_probe:
    input:
        split_files("train", "test"),
        encoder=ENCODER,
        card=f"{DATA}/card.json",
        normalization=f"{DATA}/normalization.json",
    output:
        metrics=f"{RESULTS}/evaluate/knn/{PRETRAINING}.json",
    log:
        f"{LOGS}/knn_probe/{PRETRAINING}.log",
    benchmark:
        f"{BENCHMARKS}/knn_probe/{PRETRAINING}.tsv"
    conda:
        "../../envs/knn_probe.yaml"
    threads: config["compute"]["threads"]
    resources:
        **data_resources(),
        mem_mb=4096,
    params:
        settings=settings_of("knn_probe"),
        data_dir=directory_of("card"),
    shell:
        "python -m ssl_pipeline knn-probe --data-dir {params.data_dir} --encoder {input.encoder}"
        " --settings {params.settings:q} --threads {threads}"
        " --residency {resources.residency} --memory-limit {resources.memory_limit}"
        " --metrics {output.metrics} > {log} 2>&1"


# Linear evaluation (SimCLR's protocol): frozen encoder, its features cached once, a linear classifier
# trained on them to convergence.
rule linear_probe:
    input:
        split_files("train", "test"),
        encoder=ENCODER,
        card=f"{DATA}/card.json",
        normalization=f"{DATA}/normalization.json",
    output:
        metrics=f"{RESULTS}/evaluate/linear/{PRETRAINING}.json",
    log:
        f"{LOGS}/linear_probe/{PRETRAINING}.log",
    benchmark:
        f"{BENCHMARKS}/linear_probe/{PRETRAINING}.tsv"
    conda:
        "../../envs/linear_probe.yaml"
    threads: config["compute"]["threads"]
    resources:
        **data_resources(),
        mem_mb=4096,
    params:
        settings=settings_of("linear_probe"),
        data_dir=directory_of("card"),
    shell:
        "python -m ssl_pipeline linear-probe --data-dir {params.data_dir} --encoder {input.encoder}"
        " --settings {params.settings:q} --threads {threads}"
        " --residency {resources.residency} --memory-limit {resources.memory_limit}"
        " --metrics {output.metrics} > {log} 2>&1"
