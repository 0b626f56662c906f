"""Self-supervised pretraining of the encoder on unlabeled training images.

This module is handed the images and their normalisation statistics, never a label file; the
tests check that no label file is opened while it runs. Under torchrun it runs data-parallel
(ssl_pipeline/core/distributed.py).
"""
import logging

import numpy as np
import torch

from ssl_pipeline.core import distributed
from ssl_pipeline.augment import contrastive_view
from ssl_pipeline.core.arrays import open_array
from ssl_pipeline.core.data import BatchOrder, Normalizer, device_generator
from ssl_pipeline.core.models import build_encoder, describe_encoder, encoder_card, prepare
from ssl_pipeline.objectives import COLLAPSE_FACTOR, build_objective, embedding_std, is_collapsed
from ssl_pipeline.core.residency import job_images
from ssl_pipeline.core.resume import (Checkpointer, ResumeFile, job_identity, own_state, restore_training,
                                 resume_options, shared_state)
from ssl_pipeline.core.runtime import fail_once_if_asked, setup_runtime
from ssl_pipeline.core.training import (Stopwatch, adamw, optimisation_step, save_checkpoint, warmup_cosine,
                                   write_curve)

log = logging.getLogger(__name__)


def contrastive_loss(encoder, objective, normalize, batch, augment: dict, generator, runtime):
    """uint8 batch (B, C, H, W) -> (the objective's loss on two augmented views of every image, the
    objective's embeddings of the views (2B, D)). augment: config `pretrain.augment`. The benchmark
    times this same function."""
    unit = normalize.to_unit(batch)  # (B, C, H, W) in [0, 1]
    views = torch.cat([contrastive_view(unit, augment, generator) for _ in range(2)])  # (2B, C, H, W)
    with runtime.autocast():
        views = normalize.standardise(views)
        return objective(encoder(views), views, generator)


def training_image_paths(train_images_path, unlabeled_images_path=None) -> list:
    """The arrays pretraining reads, one after the other: the train split, then the unlabeled images, if
    any (a .npy or a sharded array's index file, ssl_pipeline/core/arrays.py)."""
    paths = [train_images_path]
    if unlabeled_images_path:
        unlabeled, train = len(open_array(unlabeled_images_path)), len(open_array(train_images_path))
        if unlabeled:
            log.info("adding %d unlabeled images to the %d training images", unlabeled, train)
            paths.append(unlabeled_images_path)
    return paths


def rank_rows(paths, ranks):
    """This rank's rows of the arrays, as distributed.shard takes them; None for a single process."""
    if ranks.world_size == 1:
        return None
    total = sum(len(open_array(path)) for path in paths)
    return np.arange(ranks.rank, total, ranks.world_size)[:total // ranks.world_size]


def epoch_record(step: int, sums: list, steps_per_epoch: int, scheduler, clock, settings) -> dict:
    """One row of the curve at the end of an epoch; sums: the epoch's summed loss and embedding std."""
    elapsed = clock.seconds()
    return {
        "epoch": step // steps_per_epoch,
        "loss": round(sums[0] / steps_per_epoch, 5),
        "embedding_std": round(sums[1] / steps_per_epoch, 5),
        "learning_rate": scheduler.get_last_lr()[0],
        "elapsed_seconds": round(elapsed, 2),
        "images_per_second": round(2 * step * settings["batch_size"] / elapsed, 1),
    }


def mark_collapse(record: dict, objective_name: str, embedding_dim: int) -> None:
    """Flag the epoch's curve row, and warn, if the embeddings collapsed (the report shows the flag)."""
    record["collapsed"] = is_collapsed(record["embedding_std"], embedding_dim)
    if record["collapsed"]:
        log.warning("COLLAPSE: %s maps every image to nearly the same point (embedding std %.5f at epoch %d, "
                    "below %.5f); its features are useless for downstream tasks", objective_name,
                    record["embedding_std"], record["epoch"], COLLAPSE_FACTOR / embedding_dim ** 0.5)


def pretrain(train_images_path, normalization_path, checkpoint_path, curve_path,
             settings: dict, model_settings: dict, compute: dict, resume=None, unlabeled_images_path=None,
             residency=None, rank_logs=None, rank_timeout_seconds=600) -> dict:
    """settings: config `pretrain`; model_settings: config `model`; compute: config `compute`;
    resume: the resume file's path and config compute's resume keys (ssl_pipeline/core/resume.py);
    residency: config data's residency and memory_limit (ssl_pipeline/core/residency.py; None: auto, no limit);
    unlabeled_images_path: extra images without labels (config dataset.unlabeled), trained on beside the
    train split; rank_logs: the directory of one log per rank, when there are several;
    rank_timeout_seconds: config compute.rank_timeout_seconds (not a setting: the resume identity omits it).
    Run as several processes (torchrun on one node, srun tasks on several), each trains on its shard and
    rank 0 writes the outputs."""
    # ---- setup ------------------------------------------------------------------------------------
    fail_once_if_asked("pretrain")
    ranks = distributed.launched_ranks()
    distributed.rank_logging(ranks, rank_logs)
    if settings["batch_size"] % ranks.world_size:
        raise ValueError(f"config key pretrain.batch_size ({settings['batch_size']}) must be divisible by "
                         f"the {ranks.world_size} data-parallel processes")
    # The ranks of a node share its CPU threads.
    runtime = setup_runtime({**compute, "threads": max(1, compute["threads"] // ranks.per_node)},
                            settings["seed"])
    device = runtime.device
    distributed.join(ranks, device, rank_timeout_seconds)
    world = distributed.world(ranks)
    paths = training_image_paths(train_images_path, unlabeled_images_path)
    resume = resume_options(resume, checkpoint_path)
    images = job_images({"train": (paths, rank_rows(paths, ranks))}, device, residency,
                        resume["path"])["train"]  # uint8 (N/W, C, H, W)
    normalize = Normalizer.load(normalization_path, device)
    encoder = prepare(build_encoder(model_settings, images.shape[1]), device)
    card = encoder_card(encoder, model_settings, images.shape[1:])
    log.info("encoder %s", describe_encoder(card))
    objective_name = settings["objective"]
    objective = build_objective(objective_name, encoder, settings[objective_name]).to(device)
    optimizer = adamw(list(encoder.parameters()) + list(objective.parameters()), settings)
    generator = device_generator(device, settings["seed"] + ranks.rank)  # own order and augmentations
    # Per rank; the loss sees all ranks' images.
    order = BatchOrder(len(images), settings["batch_size"] // ranks.world_size, generator, device)
    batches = images.batches(order)
    steps_per_epoch = order.steps_per_epoch
    total_steps = settings["epochs"] * steps_per_epoch
    scheduler = warmup_cosine(optimizer, settings["warmup_epochs"] * steps_per_epoch, total_steps)
    parallel_encoder = distributed.data_parallel(encoder, ranks, device)
    parallel_objective = distributed.data_parallel(objective, ranks, device)
    # Where config compute.compile asks for it; after the data-parallel wrap, as PyTorch advises.
    runtime.compile_modules(parallel_encoder, parallel_objective)

    # ---- resume state -----------------------------------------------------------------------------
    identity = job_identity("pretrain", {"pretrain": settings, "model": model_settings, "compute": compute},
                            {"train_images": train_images_path, "normalization": normalization_path,
                             **({"unlabeled_images": unlabeled_images_path} if unlabeled_images_path else {})},
                            ranks.world_size)
    resume_file = ResumeFile(resume["path"], identity, resume["mode"])
    modules = {"encoder": encoder, "objective": objective}

    def describe(step):
        epoch, within = divmod(step - 1, steps_per_epoch)
        return f"epoch {epoch + 1}, step {within + 1} of {steps_per_epoch}"

    # The epoch's loss and embedding spread, summed on the device: reading them every step would sync.
    done, curve, epoch_sums = 0, [], torch.zeros(2, device=device)
    saved = resume_file.load()
    if saved is not None:
        done, curve, own = restore_training(saved, ranks.rank, modules, optimizer, scheduler, generator, order)
        epoch_sums = own["epoch_sums"].to(device)
        log.info("resuming from %s after %s", resume_file.path, describe(done))

    def snapshot():
        images.check()  # no state from a run whose images were found damaged
        return (shared_state(modules, optimizer, scheduler, curve=curve, elapsed_seconds=clock.seconds()),
                own_state(generator, order, epoch_sums=epoch_sums.cpu()))

    checkpointer = Checkpointer(f"pretrain {objective_name}", resume_file, resume, ranks, device, describe,
                                steps_per_epoch)
    log.info("pretraining %s on %d images, %d epochs of %d steps, in %d data-parallel process(es) on %s",
             objective_name, len(images) * ranks.world_size, settings["epochs"], steps_per_epoch,
             ranks.world_size, ", ".join(world["nodes"]))

    # ---- training loop ----------------------------------------------------------------------------
    clock = Stopwatch(device, saved["elapsed_seconds"] if saved else 0.0)
    encoder.train()
    objective.train()
    for step in range(done + 1, total_steps + 1):
        _, batch = batches.next()  # uint8 (B, C, H, W) on the device, wherever the images live
        loss, embeddings = contrastive_loss(parallel_encoder, parallel_objective, normalize, batch,
                                            settings["augment"], generator, runtime)
        optimisation_step(loss, optimizer, scheduler)
        objective.after_step(encoder, step, total_steps)  # momentum targets follow the online network
        epoch_sums += torch.stack([loss.detach().float(), embedding_std(embeddings)])
        if step % steps_per_epoch == 0:
            curve.append(epoch_record(step, epoch_sums.tolist(), steps_per_epoch, scheduler, clock, settings))
            epoch_sums.zero_()
            log.info("epoch %(epoch)d loss %(loss).4f  embedding std %(embedding_std).4f  "
                     "%(images_per_second).0f views/s", curve[-1])
            mark_collapse(curve[-1], objective_name, embeddings.shape[1])
        checkpointer.after_step(step, loss, snapshot)

    # ---- outputs ----------------------------------------------------------------------------------
    batches.close()
    images.finish()  # every shard's checksum verified before an output is written
    checkpointer.finish()
    if ranks.is_main:
        save_checkpoint(checkpoint_path, {
            "encoder": encoder.state_dict(),
            "objective_head": objective.state_dict(),
            "in_channels": images.shape[1],
            "encoder_card": {**card, "world": world},
            "config": {"pretrain": settings, "model": model_settings},
        })
        write_curve(curve_path, curve)
        resume_file.delete()
    distributed.leave(ranks)
    return curve[-1]
