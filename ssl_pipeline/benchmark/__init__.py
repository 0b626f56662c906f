"""Training speed of our pipeline against the usual PyTorch recipe (ssl_pipeline/reference.py).

    python -m ssl_pipeline.benchmark speed --out results/performance/speed.json [--tiny] [--device cuda]
    python -m ssl_pipeline.benchmark time-to-accuracy --out results/performance/time_to_accuracy.json
    python -m ssl_pipeline.benchmark profile --stage pretrain --implementation ours --out profile.txt

speed: images per second of one optimisation step of pretraining (two views, contrastive loss;
both views count) and of fine-tuning, for ours and for the reference on the same model, loss, batch
size, device, precision and thread count, built from config/config.yaml. Each measurement runs in a
fresh process of its own, so its peak memory is its own. The reference runs once per
DataLoader worker count in --workers, and the fastest is the one we compare with.
time-to-accuracy: supervised training from scratch on the whole training set with our pipeline, until
test accuracy first reaches each target.
profile: torch.profiler's table of one implementation's steps.

Modules: data.py (config, plan, raw data), trainers.py (the measured steps), measure.py (one measurement
in a process of its own), speed.py, accuracy.py (time to accuracy), profile.py, cli.py.
"""
from ssl_pipeline.benchmark.data import IMPLEMENTATIONS, SEED, STAGES, TINY, Plan, Split, load_config, load_split
from ssl_pipeline.benchmark.trainers import Trainer, build_trainer, parameter_count, pretraining_objective

__all__ = ["IMPLEMENTATIONS", "SEED", "STAGES", "TINY", "Plan", "Split", "Trainer", "build_trainer", "load_config",
           "load_split", "parameter_count", "pretraining_objective"]
