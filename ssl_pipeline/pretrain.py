"""Self-supervised pretraining of the encoder on unlabeled training images.

This module is handed the images and their normalisation statistics, never a label file; the
tests check that no label file is opened while it runs.
"""
import logging

import torch

from ssl_pipeline.augment import contrastive_view
from ssl_pipeline.data import Normalizer, device_generator, load_array, shuffled_batches
from ssl_pipeline.models import build_encoder, prepare
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.runtime import setup_runtime
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
    """settings: config `pretrain`; model_settings: config `model`; compute: config `compute`."""
    # ---- setup ------------------------------------------------------------------------------------
    runtime = setup_runtime(compute, settings["seed"])
    device = runtime.device
    images = load_array(train_images_path, device)  # uint8 (N, C, H, W), loaded once
    normalize = Normalizer(normalization_path, device)
    encoder = prepare(build_encoder(model_settings, images.shape[1]), device)
    objective = build_objective(settings["objective"], encoder.feature_dim,
                                settings[settings["objective"]]).to(device)
    optimizer = adamw(list(encoder.parameters()) + list(objective.parameters()), settings)
    steps_per_epoch = max(1, len(images) // min(settings["batch_size"], len(images)))
    total_steps = settings["epochs"] * steps_per_epoch
    scheduler = warmup_cosine(optimizer, settings["warmup_epochs"] * steps_per_epoch, total_steps)
    generator = device_generator(device, settings["seed"])
    log.info("pretraining %s on %d images, %d epochs of %d steps", settings["objective"], len(images),
             settings["epochs"], steps_per_epoch)

    # ---- training loop ----------------------------------------------------------------------------
    curve, clock = [], Stopwatch(device)
    encoder.train()
    objective.train()
    for epoch in range(1, settings["epochs"] + 1):
        epoch_loss = torch.zeros((), device=device)  # summed on the device: no per-step host sync
        for batch_index in shuffled_batches(len(images), settings["batch_size"], generator, device):
            loss = contrastive_loss(encoder, objective, normalize, images[batch_index], settings["augment"],
                                    generator, runtime)
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
    save_checkpoint(checkpoint_path, {
        "encoder": encoder.state_dict(),
        "objective_head": objective.state_dict(),
        "in_channels": images.shape[1],
        "config": {"pretrain": settings, "model": model_settings},
    })
    write_curve(curve_path, curve)
    return curve[-1]
