rule report:
    input:
        run_metrics=run_paths(f"{RESULTS}/evaluate/{RUN}/metrics.json"),
        finetune_curves=run_paths(f"{RESULTS}/finetune/{RUN}/curve.csv"),
        pretrain_curves=per_pretraining(f"{RESULTS}/pretrain/{{pretraining}}/curve.csv"),
        knn=per_pretraining(f"{RESULTS}/evaluate/knn/{{pretraining}}.json"),
        linear=per_pretraining(f"{RESULTS}/evaluate/linear/{{pretraining}}.json"),
        card=f"{DATA}/card.json",
        claims=claims_table()[:1],
    output:
        summary=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Results",
        ),
        markdown=f"{RESULTS}/report.md",
        label_efficiency_table=report(
            f"{RESULTS}/label_efficiency.csv",
            caption="../report/label_efficiency_table.rst",
            category="Tables",
        ),
        label_efficiency_html=report(
            f"{RESULTS}/tables/label_efficiency.html",
            caption="../report/label_efficiency_table.rst",
            category="Tables",
        ),
        # Mean test accuracy per (init, label fraction), for `dvc metrics diff`.
        metrics=f"{RESULTS}/metrics.json",
        label_efficiency=report(
            f"{RESULTS}/plots/label_efficiency.png",
            caption="../report/label_efficiency.rst",
            category="Results",
        ),
        training_curves=report(
            f"{RESULTS}/plots/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
        confusion_matrix=report(
            f"{RESULTS}/plots/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Results",
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1024,
    params:
        settings=settings_of("report"),
        out_dir=directory_of("summary"),
        claims=lambda wildcards, input: f"--claims {input.claims}" if input.claims else "",
    shell:
        "python -m ssl_pipeline report --run-metrics {input.run_metrics}"
        " --finetune-curves {input.finetune_curves} --pretrain-curves {input.pretrain_curves}"
        " --knn {input.knn} --linear {input.linear} --card {input.card} {params.claims}"
        " --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Checks the claims of config claims.files (config/claims/*.yaml) against every run; a claim that does
# not hold is reported as such and never fails the run.
rule claims:
    input:
        claim_files=config["claims"]["files"],
        run_metrics=run_paths(f"{RESULTS}/evaluate/{RUN}/metrics.json"),
        knn=per_pretraining(f"{RESULTS}/evaluate/knn/{{pretraining}}.json"),
        linear=per_pretraining(f"{RESULTS}/evaluate/linear/{{pretraining}}.json"),
    output:
        claims=report(
            f"{RESULTS}/claims.csv",
            caption="../report/claims.rst",
            category="Tables",
        ),
        html=report(
            f"{RESULTS}/tables/claims.html",
            caption="../report/claims.rst",
            category="Tables",
        ),
    log:
        f"{LOGS}/claims.log",
    conda:
        "../../envs/claims.yaml"
    threads: 1
    resources:
        mem_mb=1024,
    params:
        settings=settings_of("claims"),
        variants=json.dumps({variant: run_name(config, variant) for variant in sweep_variants(config)}),
    shell:
        "python -m ssl_pipeline claims --claim-files {input.claim_files} --run-metrics {input.run_metrics}"
        " --knn {input.knn} --linear {input.linear} --settings {params.settings:q}"
        " --variants {params.variants:q} --out {output.claims} --html {output.html} > {log} 2>&1"
