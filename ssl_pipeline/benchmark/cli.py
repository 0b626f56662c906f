"""The command line of python -m ssl_pipeline.benchmark."""
import argparse
import dataclasses
import sys
from pathlib import Path

from ssl_pipeline import benchmark
from ssl_pipeline.core.artifacts import write_json, write_text
from ssl_pipeline.benchmark import race as race_mode
from ssl_pipeline.benchmark import residency as residency_mode
from ssl_pipeline.benchmark.accuracy import accuracy_table, time_to_accuracy
from ssl_pipeline.benchmark.data import IMPLEMENTATIONS, STAGES, TINY, Plan, default_raw_dir, load_config
from ssl_pipeline.benchmark.profile import profile
from ssl_pipeline.benchmark.speed import default_worker_counts, speed, speed_table
from ssl_pipeline.objectives import OBJECTIVES


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.benchmark", description=benchmark.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    def common(mode):
        mode.add_argument("--configfile", action="append", default=[],
                          help="override file merged over config/config.yaml (repeatable), as for snakemake")
        mode.add_argument("--raw-dir", type=Path, default=None,
                          help="directory with the IDX files (.gz or not); default: results/raw, else the "
                               "first local mirror in config key dataset.mirrors")
        mode.add_argument("--device", default=None,
                          help="auto | cpu | cuda | cuda:N (default: config compute.device)")
        mode.add_argument("--threads", type=int, default=None,
                          help="torch threads (default: config compute.threads, at most the CPUs available)")
        mode.add_argument("--tiny", action="store_true", help=f"a few steps on {TINY.images} images, for CI")

    speed_mode = modes.add_parser("speed", help="images/s and memory of ours and the reference")
    common(speed_mode)
    speed_mode.add_argument("--out", type=Path, required=True, help="JSON of every figure")
    speed_mode.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    speed_mode.add_argument("--workers", type=int, nargs="+", default=None,
                            help="DataLoader worker counts to try for the reference; the fastest counts "
                                 f"(default {default_worker_counts()} here; --tiny: 1)")
    speed_mode.add_argument("--no-compiled", dest="compiled", action="store_false",
                            help="leave out the row of ours compiled with torch.compile")
    speed_mode.add_argument("--no-lightly", dest="lightly", action="store_false",
                            help="leave out the pretraining rows of lightly's recipe (benchmark/peer.py), "
                                 "which runs once per --workers count, as the reference")
    speed_mode.add_argument("--repetitions", type=int, default=Plan.repetitions)
    speed_mode.add_argument("--repetition-seconds", type=float, default=Plan.repetition_seconds,
                            help="length of each timed repetition")

    accuracy_mode = modes.add_parser("time-to-accuracy", help="wall time until test accuracy reaches targets")
    common(accuracy_mode)
    accuracy_mode.add_argument("--out", type=Path, required=True)
    accuracy_mode.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.92])
    accuracy_mode.add_argument("--epochs", type=int, default=None,
                               help="length of the learning-rate schedule (default 12; --tiny: 1)")
    accuracy_mode.add_argument("--time-limit", type=float, default=float("inf"),
                               help="stop at the first evaluation after this many seconds of training")
    accuracy_mode.add_argument("--evaluations-per-epoch", type=int, default=1)

    profile_mode = modes.add_parser("profile", help="torch.profiler table of one implementation's steps")
    common(profile_mode)
    profile_mode.add_argument("--out", type=Path, required=True, help="text file for the table")
    profile_mode.add_argument("--stage", choices=STAGES, required=True)
    profile_mode.add_argument("--implementation", choices=IMPLEMENTATIONS, required=True)
    profile_mode.add_argument("--workers", type=int, default=0)
    profile_mode.add_argument("--steps", type=int, default=10)

    race = modes.add_parser("race", help="kNN accuracy after each pretraining epoch, ours against lightly")
    common(race)
    race.add_argument("--out", type=Path, required=True, help="JSON of both curves and the times to the target")
    race.add_argument("--plot", type=Path, default=None, help="PNG of both curves (default: --out with .png)")
    race.add_argument("--objective", choices=sorted(OBJECTIVES), default="simclr", help="default %(default)s")
    race.add_argument("--epochs", type=int, default=None,
                      help=f"pretraining epochs of each, the schedule's length (default {race_mode.DEFAULT_EPOCHS}; "
                           "--tiny: 2)")
    race.add_argument("--images", type=int, default=None,
                      help=f"train images: pretraining set and kNN memory bank (default {race_mode.DEFAULT_IMAGES:,}; "
                           f"--tiny: {TINY.images})")
    race.add_argument("--test-images", type=int, default=None,
                      help=f"test images the kNN probe classifies (default {race_mode.DEFAULT_TEST_IMAGES:,}; "
                           f"--tiny: {TINY.images})")
    race.add_argument("--workers", type=int, default=race_mode.DEFAULT_WORKERS,
                      help="DataLoader workers of lightly's trainer (default %(default)s: the fastest here)")
    race.add_argument("--target", type=float, default=None,
                      help="kNN accuracy to time both to (default: the lower of the two final accuracies)")
    residency = modes.add_parser("residency", help="pretraining images/s with the images on the device, the host "
                                                   "and the disk (config data.residency), warm and cold page cache")
    common(residency)
    residency.add_argument("--out", type=Path, required=True, help="JSON of every figure")
    residency.add_argument("--data-dir", type=Path, default=Path("results/performance/residency-data"),
                           help="where the train images are written as the .npy that training reads")
    residency.add_argument("--steps", type=int, default=30, help="steps of each timed repetition (warm)")
    residency.add_argument("--warmup", type=int, default=5, help="untimed steps of each residency first")
    residency.add_argument("--repetitions", type=int, default=3)
    residency.add_argument("--cold-steps", type=int, default=None,
                           help="steps timed after dropping the file from the page cache (default: one epoch; 0: "
                                "no cold measurement)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m ssl_pipeline.benchmark", *argv])
    config = load_config(args.configfile)
    raw_dir = args.raw_dir or default_raw_dir(config)
    compute = dict(config["compute"])
    compute.update({key: value for key, value in (("device", args.device), ("threads", args.threads)) if value})
    plan = TINY if args.tiny else Plan()
    log = lambda message: print(message, file=sys.stderr, flush=True)

    if args.mode == "speed":
        plan = dataclasses.replace(plan, repetitions=args.repetitions, repetition_seconds=(
            plan.repetition_seconds if args.tiny else args.repetition_seconds))
        workers = args.workers or ([1] if args.tiny else default_worker_counts())
        results = speed(config, raw_dir, compute, plan, workers, tuple(args.stages), log, args.compiled,
                        args.lightly)
        results["meta"]["command"] = command
        write_json(args.out, results)
        print(speed_table(results))
    elif args.mode == "time-to-accuracy":
        epochs = args.epochs or (1 if args.tiny else 12)
        results = time_to_accuracy(config, raw_dir, compute, sorted(args.targets), epochs, args.time_limit,
                                   args.evaluations_per_epoch, plan.images and 4 * plan.images, plan.batch_size,
                                   log)
        results["meta"]["command"] = command
        write_json(args.out, results)
        print(accuracy_table(results))
    elif args.mode == "race":
        results = race_mode.race(
            config, raw_dir, compute, args.objective, args.epochs or (2 if args.tiny else race_mode.DEFAULT_EPOCHS),
            args.images or (plan.images if args.tiny else race_mode.DEFAULT_IMAGES),
            args.test_images or (plan.images if args.tiny else race_mode.DEFAULT_TEST_IMAGES), args.workers,
            plan.batch_size, args.target, log)
        results["meta"]["command"] = command
        write_json(args.out, results)
        race_mode.plot_race(results, args.plot or args.out.with_suffix(".png"))
        print(race_mode.race_table(results))
    elif args.mode == "residency":
        if args.tiny:
            config = {**config, "pretrain": {**config["pretrain"], "batch_size": plan.batch_size}}
        results = residency_mode.residency_benchmark(
            config, raw_dir, compute, args.data_dir, 3 if args.tiny else args.steps, 1 if args.tiny else args.warmup,
            2 if args.tiny else args.repetitions, 2 if args.tiny else args.cold_steps, plan.images, log)
        results["meta"] = {"command": command, "cpu": residency_mode.cpu_model()}
        write_json(args.out, results)
        print(residency_mode.residency_table(results))
    else:
        table = profile(config, raw_dir, compute, args.stage, args.implementation, args.workers, args.steps,
                        plan)
        write_text(args.out, table)
        print(table)
    return 0
