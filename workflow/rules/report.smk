rule report:
    input:
        run_metrics=run_paths(f"{RESULTS}/evaluate/{RUN}/metrics.json"),
        finetune_curves=run_paths(f"{RESULTS}/finetune/{RUN}/curve.csv"),
        pretrain_curves=per_objective(f"{RESULTS}/pretrain/{{objective}}/curve.csv"),
        knn=per_objective(f"{RESULTS}/evaluate/knn/{{objective}}.json"),
        card=f"{DATA}/card.json",
    output:
        summary=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Results",
        ),
        markdown=f"{RESULTS}/report.md",
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
    params:
        settings=settings_of("report"),
        out_dir=directory_of("summary"),
    log:
        f"{LOGS}/report.log",
    threads: 1
    resources:
        mem_mb=1024,
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m ssl_pipeline report --run-metrics {input.run_metrics}"
        " --finetune-curves {input.finetune_curves} --pretrain-curves {input.pretrain_curves}"
        " --knn {input.knn} --card {input.card} --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
