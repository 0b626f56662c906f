"""Self-supervised pretraining of the encoder on unlabeled training images.

This module is handed the images and their normalisation statistics, never a label file; the
tests check that no label file is opened while it runs. Under torchrun it runs data-parallel
(ssl_pipeline/distributed.py).
"""
import logging

import torch

from ssl_pipeline import distributed
from ssl_pipeline.augment import contrastive_view
from ssl_pipeline.data import Normalizer, device_generator, load_array, shuffled_batches
from ssl_pipeline.models import build_encoder, prepare
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.runtime import fail_once_if_asked, setup_runtime
from ssl_pipeline.training import (Stopwatch, adamw, optimisation_step, save_checkpoint, warmup_cosine,
                                   write_curve)

log = logging.getLogger(__name__)


def contrastive_loss(encoder, objective, normalize, batch, augment: dict, generator, runtime):
    """uint8 batch (B, C, H, W) -> the objective's loss on two augmented views of every image.
    augment: config `pretrain.augment`. The benchmark times this same function."""
    unit = normalize.to_unit(batch)  # (B, C, H, W) in [0, 1]
    views = torch.cat([contrastive_view(unit, augment, generator) for _ in range(2)])  # (2B, C, H, W)
    with runtime.autocast():
        features = encoder(normalize.standardise(views))  # (2B, F)
        return objective(*features.chunk(2))


def pretrain(train_images_path, normalization_path, checkpoint_path, curve_path,
             settings: dict, model_settings: dict, compute: dict) -> dict:
    """settings: config `pretrain`; model_settings: config `model`; compute: config `compute`.
    Run by torchrun as several processes, each trains on its shard and rank 0 writes the outputs."""
    # ---- setup ------------------------------------------------------------------------------------
    fail_once_if_asked("pretrain")
    ranks = distributed.launched_ranks()
    if settings["batch_size"] % ranks.world_size:
        raise ValueError(f"config key pretrain.batch_size ({settings['batch_size']}) must be divisible by "
                         f"the {ranks.world_size} data-parallel processes")
    # The ranks share the job's CPU threads.
    runtime = setup_runtime({**compute, "threads": max(1, compute["threads"] // ranks.world_size)},
                            settings["seed"])
    device = runtime.device
    distributed.join(ranks, device)
    images = distributed.shard(load_array(train_images_path, "cpu"), ranks).to(device)  # uint8 (N/W, C, H, W)
    normalize = Normalizer.load(normalization_path, device)
    encoder = prepare(build_encoder(model_settings, images.shape[1]), device)
    objective = build_objective(settings["objective"], encoder.feature_dim,
                                settings[settings["objective"]]).to(device)
    optimizer = adamw(list(encoder.parameters()) + list(objective.parameters()), settings)
    batch_size = settings["batch_size"] // ranks.world_size  # per rank; the loss sees all ranks' images
    steps_per_epoch = max(1, len(images) // min(batch_size, len(images)))
    total_steps = settings["epochs"] * steps_per_epoch
    scheduler = warmup_cosine(optimizer, settings["warmup_epochs"] * steps_per_epoch, total_steps)
    generator = device_generator(device, settings["seed"] + ranks.rank)  # own order and augmentations
    parallel_encoder = distributed.data_parallel(encoder, ranks, device)
    parallel_objective = distributed.data_parallel(objective, ranks, device)
    log.info("pretraining %s on %d images, %d epochs of %d steps, in %d data-parallel process(es)",
             settings["objective"], len(images) * ranks.world_size, settings["epochs"], steps_per_epoch,
             ranks.world_size)

    # ---- training loop ----------------------------------------------------------------------------
    curve, clock = [], Stopwatch(device)
    encoder.train()
    objective.train()
    for epoch in range(1, settings["epochs"] + 1):
        epoch_loss = torch.zeros((), device=device)  # summed on the device: no per-step host sync
        for batch_index in shuffled_batches(len(images), batch_size, generator, device):
            loss = contrastive_loss(parallel_encoder, parallel_objective, normalize, images[batch_index],
                                    settings["augment"], generator, runtime)
            optimisation_step(loss, optimizer, scheduler)
            epoch_loss += loss.detach()
        elapsed = clock.seconds()
        curve.append({
            "epoch": epoch,
            "loss": round(epoch_loss.item() / steps_per_epoch, 5),
            "learning_rate": scheduler.get_last_lr()[0],
            "elapsed_seconds": round(elapsed, 2),
            "images_per_second": round(2 * epoch * steps_per_epoch * settings["batch_size"] / elapsed, 1),
        })
        log.info("epoch %(epoch)d loss %(loss).4f  %(images_per_second).0f views/s", curve[-1])

    # ---- outputs ----------------------------------------------------------------------------------
    if ranks.is_main:
        save_checkpoint(checkpoint_path, {
            "encoder": encoder.state_dict(),
            "objective_head": objective.state_dict(),
            "in_channels": images.shape[1],
            "config": {"pretrain": settings, "model": model_settings},
        })
        write_curve(curve_path, curve)
    distributed.leave(ranks)
    return curve[-1]
