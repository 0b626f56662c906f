"""Training speed of our pipeline against the usual PyTorch recipe (ssl_pipeline/benchmark/reference.py) and
against the self-supervised learning library lightly (peer.py).

    python -m ssl_pipeline.benchmark speed --out results/performance/speed.json [--tiny] [--device cuda]
    python -m ssl_pipeline.benchmark time-to-accuracy --out results/performance/time_to_accuracy.json
    python -m ssl_pipeline.benchmark profile --stage pretrain --implementation ours --out profile.txt
    python -m ssl_pipeline.benchmark race --out results/performance/race.json [--objective byol] [--tiny]
    python -m ssl_pipeline.benchmark residency --out results/performance/residency.json [--tiny]

speed: images per second of one optimisation step of pretraining (two views, contrastive loss;
both views count) and of fine-tuning, for ours and for the reference on the same model, loss, batch
size, device, precision and thread count, built from config/config.yaml; and, for every pretraining
objective, for the peer library lightly (peer.py: its transforms, heads and loss around our backbone,
with our batch size, AdamW, schedule and precision, fed by a DataLoader; --no-lightly leaves it out).
Each measurement runs in a fresh process of its own, so its peak memory is its own. The reference and
lightly run once per DataLoader worker count in --workers, and the fastest of each is the one we
compare with (speed-up over reference, speed-up over lightly: ours / lightly).
time-to-accuracy: supervised training from scratch on the whole training set with our pipeline, until
test accuracy first reaches each target.
profile: torch.profiler's table of one implementation's steps (ours, reference, or lightly in pretraining).
race: pretraining quality against time, ours against lightly from the same initial backbone on the same
data, epochs and hyperparameters: the kNN test accuracy of each backbone after every epoch (clock
stopped), and each one's training seconds to a target accuracy (default: the lower final accuracy).
residency: pretraining images/s with the images on the device, in host memory and memory-mapped on disk
(config data.residency), as ratios to the device, with the file in the page cache and from a cold cache.

Modules: data.py (config, plan, raw data), trainers.py (the measured steps), peer.py (lightly's step),
measure.py (one measurement in a process of its own), speed.py, accuracy.py (time to accuracy),
profile.py, race.py (ours against lightly by kNN accuracy), residency.py (where the images live), cli.py.
"""
from ssl_pipeline.benchmark.data import IMPLEMENTATIONS, SEED, STAGES, TINY, Plan, Split, load_config, load_split
from ssl_pipeline.benchmark.peer import build_lightly_trainer  # imports lightly only when called
from ssl_pipeline.benchmark.trainers import Trainer, build_trainer, parameter_count, pretraining_objective

__all__ = ["IMPLEMENTATIONS", "SEED", "STAGES", "TINY", "Plan", "Split", "Trainer", "build_lightly_trainer",
           "build_trainer", "load_config", "load_split", "parameter_count", "pretraining_objective"]
