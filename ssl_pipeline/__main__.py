"""Command line entry the Snakemake rules call: `python -m ssl_pipeline <stage> [options]`.

Settings arrive as one JSON string: the config keys the stage reads (ssl_pipeline/core/settings.py). Each
stage imports only its own module (ssl_pipeline/stages/), so a rule's conda env needs only what that stage
uses (tests/test_envs.py checks this).
"""
import argparse
import json
import logging
import sys


def json_argument(text):
    return json.loads(text)


def add_settings(parser, what):
    parser.add_argument("--settings", type=json_argument, required=True,
                        help=f"JSON of the config keys this stage reads: {what} (ssl_pipeline/core/settings.py)")


def add_threads(parser):
    parser.add_argument("--threads", type=int, required=True, help="CPU threads the scheduler granted")


def add_resume(parser):
    """Resume options come from config `compute` as resources, not as --settings: editing them must
    not rerun a finished job (ssl_pipeline/core/settings.py, NOT_JOB_SETTINGS)."""
    parser.add_argument("--resume-file", required=True,
                        help="where the job keeps its resume state (not an output: it survives a failure)")
    parser.add_argument("--checkpoint-every", type=float, required=True,
                        help="minutes of wall time between writes of the resume state; 0: every step")
    parser.add_argument("--stop-margin-seconds", type=int, required=True,
                        help="seconds before a Slurm job's time limit at which training stops")
    parser.add_argument("--resume", choices=["same_settings", "any_settings", "off"], required=True,
                        help="continue from a resume file of the same settings, of any settings, or never")


def memory_limit_argument(text):
    return None if text.lower() in ("none", "null") else int(text)


def add_residency(parser):
    """Where the job keeps its images (config data.residency, data.memory_limit; ssl_pipeline/core/residency.py):
    resources, not --settings, since the results do not depend on them (NOT_JOB_SETTINGS)."""
    parser.add_argument("--residency", choices=["auto", "device", "host", "disk"], default="auto",
                        help="where the images live: the device, (pinned) host memory, memory-mapped on disk, "
                             "or auto: the first that fits (default %(default)s)")
    parser.add_argument("--memory-limit", type=memory_limit_argument, default=None,
                        help="bytes of host memory the images may take (auto chooses within it); none: no limit")


def residency_of(args) -> dict:
    return {"residency": args.residency, "memory_limit": args.memory_limit}


def compute_of(args) -> dict:
    return {**args.settings["compute"], "threads": args.threads}


def resume_of(args) -> dict:
    return {"path": args.resume_file, "checkpoint_every": args.checkpoint_every,
            "stop_margin_seconds": args.stop_margin_seconds, "mode": args.resume}


def run_download(args):
    from ssl_pipeline.stages.download import RetryPolicy, download_dataset
    from ssl_pipeline.core.raw_files import dataset_files, raw_paths, unlabeled_files

    dataset, retry = args.settings["dataset"], args.settings["download"]
    policy = RetryPolicy(retry["attempts"], retry["backoff_seconds"], retry["timeout_seconds"], retry["max_bytes"],
                         args.progress_seconds)
    paths = raw_paths(dataset, args.out_dir)
    download_dataset(dataset_files(dataset), dataset["mirrors"], paths["dataset"], policy,
                     archives=dataset["format"] != "idx", partial_dir=args.partial_dir)
    own = unlabeled_files(dataset)
    if own:
        unlabeled = dataset["unlabeled"]
        download_dataset(own, unlabeled.get("mirrors") or dataset["mirrors"], paths["unlabeled"], policy,
                         archives="archive" in own, partial_dir=args.partial_dir)


def run_preprocess(args):
    from ssl_pipeline.stages.preprocess import preprocess, raw_inputs

    dataset, data = args.settings["dataset"], args.settings["data"]
    raw, options, unlabeled = raw_inputs(dataset, args.raw_dir)
    preprocess(raw, args.out_dir, dataset["name"], data["validation_fraction"], data["split_seed"],
               dataset["class_names"], dataset["format"], options, unlabeled)


def run_preprocess_plan(args):
    from ssl_pipeline.stages.preprocess import raw_inputs
    from ssl_pipeline.stages.preprocess_shards import plan_shards

    dataset, data = args.settings["dataset"], args.settings["data"]
    raw, options, unlabeled = raw_inputs(dataset, args.raw_dir)
    plan_shards(raw, args.out_dir, dataset["name"], data["validation_fraction"], data["split_seed"],
                args.settings["preprocess"]["shard_images"], dataset["class_names"], dataset["format"], options,
                unlabeled)


def run_preprocess_shard(args):
    from ssl_pipeline.stages.preprocess import raw_inputs
    from ssl_pipeline.stages.preprocess_shards import write_shard

    dataset = args.settings["dataset"]
    raw, options, unlabeled = raw_inputs(dataset, args.raw_dir)
    write_shard(raw, args.data_dir, args.split, args.shard, dataset["format"], options, unlabeled)


def run_preprocess_index(args):
    from ssl_pipeline.stages.preprocess_shards import write_indexes

    write_indexes(args.data_dir)


def run_label_subset(args):
    from ssl_pipeline.stages.preprocess import write_label_subset

    write_label_subset(args.labels, args.card, args.fraction, args.seed, args.out)


def run_pretrain(args):
    from ssl_pipeline.core.distributed import processes_for, relaunch_under_torchrun
    from ssl_pipeline.core.multinode import launch_on_nodes, slurm_task_environment
    from ssl_pipeline.stages.pretrain import pretrain

    nodes = args.settings["compute"].get("nodes", 1)
    # On several nodes the GPUs are a gres per node, not the job's gpu resource: auto is one per node there,
    # as the rule's resources ask Slurm for (pretrain_resources in workflow/rules/common.smk).
    per_node = processes_for(args.settings["pretrain"]["processes"], args.gpus if nodes == 1 else 0)
    if nodes > 1:
        # This process becomes the launcher of nodes x per_node srun tasks, each running this same command.
        launch_on_nodes(args.launcher, nodes, per_node, max(1, args.threads // per_node), sys.argv[1:],
                        args.rank_timeout_seconds)
        slurm_task_environment()
    else:
        # Several processes: this one becomes torchrun, which runs this same command once per process.
        relaunch_under_torchrun(per_node, sys.argv[1:])
    pretrain(args.train_images, args.normalization, args.checkpoint, args.curve,
             args.settings["pretrain"], args.settings["model"], compute_of(args), resume_of(args),
             args.unlabeled_images, residency_of(args), args.rank_logs, args.rank_timeout_seconds)


def run_finetune(args):
    from ssl_pipeline.stages.finetune import finetune

    finetune(args.data_dir, args.subset, args.encoder, args.model, args.curve, args.init, args.fraction,
             args.seed, args.settings["finetune"], args.settings["model"], compute_of(args), resume_of(args),
             residency_of(args))


def run_evaluate(args):
    from ssl_pipeline.stages.evaluate import evaluate_classifier

    evaluate_classifier(args.data_dir, args.model, args.metrics, compute_of(args), residency_of(args))


def run_knn_probe(args):
    from ssl_pipeline.stages.evaluate import evaluate_knn

    evaluate_knn(args.data_dir, args.encoder, args.metrics, args.settings["evaluate"], compute_of(args),
                 residency_of(args))


def run_linear_probe(args):
    from ssl_pipeline.stages.evaluate import evaluate_linear

    evaluate_linear(args.data_dir, args.encoder, args.metrics, args.settings["evaluate"]["linear_probe"],
                    compute_of(args), residency_of(args))


def run_report(args):
    from ssl_pipeline.core.artifacts import read_json
    from ssl_pipeline.stages.report import build_report, read_csv

    run_metrics = [read_json(path) for path in args.run_metrics]
    if len(args.finetune_curves) != len(run_metrics):
        raise ValueError("--finetune-curves must list one curve per --run-metrics file, in the same order")
    curves = [(metrics, read_csv(path)) for metrics, path in zip(run_metrics, args.finetune_curves)]
    if not len(args.pretrain_curves) == len(args.knn) == len(args.linear):
        raise ValueError("--pretrain-curves, --knn and --linear must list one file per pretraining run, in the "
                         "same order")
    pretraining = [{"knn": read_json(knn), "linear": read_json(linear), "curve": read_csv(curve)}
                   for knn, linear, curve in zip(args.knn, args.linear, args.pretrain_curves)]
    claims = read_csv(args.claims) if args.claims else None
    build_report(run_metrics, curves, pretraining, read_json(args.card), args.settings["report"], args.out_dir,
                 claims)


def run_claims(args):
    from ssl_pipeline.core.artifacts import read_json
    from ssl_pipeline.claims.check import check_claims

    check_claims(args.claim_files, [read_json(path) for path in args.run_metrics],
                 [read_json(path) for path in args.knn], [read_json(path) for path in args.linear],
                 args.settings["claims"], args.variants, args.out, args.html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)

    stage = stages.add_parser("download", help="fetch and verify the dataset files")
    add_settings(stage, "dataset.files, dataset.mirrors, download")
    stage.add_argument("--out-dir", required=True)
    stage.add_argument("--partial-dir", required=True,
                       help="where partial files wait for the next run to continue them (not an output)")
    stage.add_argument("--progress-seconds", type=float, required=True,
                       help="seconds between progress lines (config download.progress_seconds, a resource)")
    stage.set_defaults(run=run_download)

    stage = stages.add_parser("preprocess", help="validate IDX files, split, normalise, write the card")
    stage.add_argument("--raw-dir", required=True)
    add_settings(stage, "dataset.name, dataset.files, dataset.class_names, data")
    stage.add_argument("--out-dir", required=True)
    stage.set_defaults(run=run_preprocess)

    # Preprocessing in shards (config preprocess.shard_images): plan, one job per shard, then the index.
    stage = stages.add_parser("preprocess-plan", help="labels, validation split and the plan of the shards")
    stage.add_argument("--raw-dir", required=True)
    add_settings(stage, "dataset.*, data.validation_fraction, data.split_seed, preprocess")
    stage.add_argument("--out-dir", required=True)
    stage.set_defaults(run=run_preprocess_plan)

    stage = stages.add_parser("preprocess-shard", help="decode the images of one shard of the plan")
    stage.add_argument("--raw-dir", required=True)
    add_settings(stage, "dataset.*, data.validation_fraction, data.split_seed, preprocess")
    stage.add_argument("--data-dir", required=True, help="the plan's directory (results/data)")
    stage.add_argument("--split", choices=["train", "val", "test", "unlabeled"], required=True)
    stage.add_argument("--shard", required=True, help="the shard's number, as in its file name (00003)")
    stage.set_defaults(run=run_preprocess_shard)

    stage = stages.add_parser("preprocess-index", help="check the shards; write the index files, "
                                                       "normalisation and card")
    stage.add_argument("--data-dir", required=True)
    stage.set_defaults(run=run_preprocess_index)

    stage = stages.add_parser("label-subset", help="one stratified, nested labeled subset")
    stage.add_argument("--labels", required=True)
    stage.add_argument("--card", required=True)
    stage.add_argument("--fraction", type=float, required=True)
    stage.add_argument("--seed", type=int, required=True)
    stage.add_argument("--out", required=True)
    stage.set_defaults(run=run_label_subset)

    stage = stages.add_parser("pretrain", help="self-supervised pretraining of the encoder")
    stage.add_argument("--train-images", required=True)
    stage.add_argument("--unlabeled-images", default=None,
                       help="extra unlabeled images (N, C, H, W) that pretraining sees beside the train split")
    stage.add_argument("--normalization", required=True)
    add_settings(stage, "pretrain, model, compute")
    add_threads(stage)
    stage.add_argument("--gpus", type=int, default=0,
                       help="GPUs the scheduler granted the job; with pretrain.processes 'auto', one "
                            "data-parallel process per GPU")
    stage.add_argument("--launcher", default="srun",
                       help="the Slurm launcher of the ranks when config compute.nodes > 1 (the rule's resource mpi)")
    stage.add_argument("--rank-timeout-seconds", type=int, default=600,
                       help="config compute.rank_timeout_seconds: how long a rank waits for the others in a collective")
    stage.add_argument("--rank-logs", default=None,
                       help="directory of one log per data-parallel rank (rank<R>-<node>.log)")
    add_resume(stage)
    add_residency(stage)
    stage.add_argument("--checkpoint", required=True)
    stage.add_argument("--curve", required=True)
    stage.set_defaults(run=run_pretrain)

    stage = stages.add_parser("finetune", help="train a classifier on one labeled subset")
    stage.add_argument("--data-dir", required=True)
    stage.add_argument("--subset", required=True)
    stage.add_argument("--encoder", default=None, help="pretrained encoder; omit for init 'scratch'")
    stage.add_argument("--init", required=True)
    stage.add_argument("--fraction", type=float, required=True)
    stage.add_argument("--seed", type=int, required=True)
    add_settings(stage, "finetune, model, compute")
    add_threads(stage)
    add_resume(stage)
    add_residency(stage)
    stage.add_argument("--model", required=True)
    stage.add_argument("--curve", required=True)
    stage.set_defaults(run=run_finetune)

    stage = stages.add_parser("evaluate", help="test metrics of one fine-tuned model")
    stage.add_argument("--data-dir", required=True)
    stage.add_argument("--model", required=True)
    add_settings(stage, "compute")
    add_threads(stage)
    add_residency(stage)
    stage.add_argument("--metrics", required=True)
    stage.set_defaults(run=run_evaluate)

    for name, what, keys, run in [
            ("knn-probe", "kNN accuracy of the encoder and of raw pixels", "evaluate.knn_*, compute", run_knn_probe),
            ("linear-probe", "linear-evaluation accuracy of the frozen encoder", "evaluate.linear_probe, compute",
             run_linear_probe)]:
        stage = stages.add_parser(name, help=what)
        stage.add_argument("--data-dir", required=True)
        stage.add_argument("--encoder", required=True)
        add_settings(stage, keys)
        add_threads(stage)
        add_residency(stage)
        stage.add_argument("--metrics", required=True)
        stage.set_defaults(run=run)

    stage = stages.add_parser("claims", help="check the claims of config claims.files: results/claims.csv")
    stage.add_argument("--claim-files", nargs="+", required=True)
    stage.add_argument("--run-metrics", nargs="+", required=True)
    stage.add_argument("--knn", nargs="+", required=True)
    stage.add_argument("--linear", nargs="+", required=True)
    add_settings(stage, "claims")
    stage.add_argument("--variants", type=json_argument, required=True,
                       help="JSON: every sweep variant's name -> the name its jobs run under (base for rows equal to it)")
    stage.add_argument("--out", required=True, help="claims.csv")
    stage.add_argument("--html", required=True, help="the same table as an HTML page")
    stage.set_defaults(run=run_claims)

    stage = stages.add_parser("report", help="summary.csv, report.md and plots")
    stage.add_argument("--run-metrics", nargs="+", required=True)
    stage.add_argument("--finetune-curves", nargs="+", required=True)
    stage.add_argument("--pretrain-curves", nargs="+", required=True, help="one per pretraining run")
    stage.add_argument("--knn", nargs="+", required=True, help="the kNN probes, one per pretraining run, in the same order")
    stage.add_argument("--linear", nargs="+", required=True, help="the linear probes, in the same order")
    stage.add_argument("--claims", default=None, help="results/claims.csv, when config claims.files lists claims")
    stage.add_argument("--card", required=True)
    add_settings(stage, "report")
    stage.add_argument("--out-dir", required=True)
    stage.set_defaults(run=run_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except Exception as error:
        if hasattr(error, "exit_status"):  # a stop the stage explains fully (ssl_pipeline/core/resume.py)
            logging.getLogger("ssl_pipeline").error("%s", error)
            return error.exit_status
        # One clear line for the log; the traceback follows for debugging.
        logging.getLogger("ssl_pipeline").error("%s failed: %s", args.stage, error)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
