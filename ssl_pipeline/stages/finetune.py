"""Supervised fine-tuning (or a linear probe) on one labeled subset, from the pretrained encoder or
from scratch. The checkpoint kept is the one with the best validation accuracy."""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ssl_pipeline.core.artifacts import read_json
from ssl_pipeline.augment import supervised_view
from ssl_pipeline.core.arrays import split_images_path
from ssl_pipeline.core.data import BatchOrder, Normalizer, device_generator, load_labels
from ssl_pipeline.core.distributed import Ranks
from ssl_pipeline.core.inference import accuracy
from ssl_pipeline.core.residency import job_images
from ssl_pipeline.core.models import Classifier, build_encoder, describe_encoder, encoder_card, prepare
from ssl_pipeline.core.resume import (Checkpointer, ResumeFile, job_identity, own_state, restore_training,
                                 resume_options, shared_state)
from ssl_pipeline.core.runtime import setup_runtime
from ssl_pipeline.core.training import (Stopwatch, adamw, load_checkpoint, optimisation_step, pretraining_identity,
                                   save_checkpoint, warmup_cosine, write_curve)

log = logging.getLogger(__name__)
INITS = ("pretrained", "scratch")


def load_pretrained_encoder(encoder, checkpoint_path, model_settings) -> dict:
    """Load the online encoder of a pretraining checkpoint into `encoder`; -> the pretraining run it
    came from (objective, variant, pretraining seed). BYOL's and MoCo's momentum targets stay in the checkpoint: fine-tuning starts
    from the online encoder, as both papers evaluate it."""
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint["config"]["model"] != model_settings:
        raise ValueError(f"{checkpoint_path} was pretrained with model settings "
                         f"{checkpoint['config']['model']}, but config key `model` is {model_settings}")
    encoder.load_state_dict(checkpoint["encoder"])
    return pretraining_identity(checkpoint)


def step_budget(num_labeled: int, settings: dict) -> int:
    """`epochs` passes over the labeled subset, but at least `min_steps` so tiny subsets still converge."""
    steps_per_epoch = max(1, num_labeled // min(settings["batch_size"], num_labeled))
    return max(settings["min_steps"], settings["epochs"] * steps_per_epoch)


def supervised_loss(model, normalize, batch, labels, settings: dict, generator, runtime):
    """uint8 batch (B, C, H, W) and labels (B,) -> cross entropy on one augmented view.
    settings: config `finetune`. The benchmark times this same function."""
    views = supervised_view(normalize.to_unit(batch), settings["augment"], generator)
    with runtime.autocast():
        logits = model(normalize.standardise(views))  # (B, num_classes)
        return F.cross_entropy(logits, labels, label_smoothing=settings["label_smoothing"])


def finetune(data_dir, subset_path, encoder_path, model_path, curve_path, init: str,
             label_fraction: float, seed: int, settings: dict, model_settings: dict, compute: dict,
             resume=None, residency=None) -> dict:
    """data_dir: preprocess's output directory; encoder_path: None when init is 'scratch'; resume: the
    resume file's path and config compute's resume keys (ssl_pipeline/core/resume.py); residency: config
    data's residency and memory_limit (ssl_pipeline/core/residency.py; None: auto, no limit)."""
    # ---- setup ------------------------------------------------------------------------------------
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    runtime = setup_runtime(compute, seed)
    device = runtime.device
    data_files = {name: f"{data_dir}/{name}.{kind}" for name, kind in [
        ("card", "json"), ("normalization", "json"), ("train_labels", "npy"), ("val_labels", "npy")]}
    data_files.update({f"{split}_images": str(split_images_path(data_dir, split)) for split in ("train", "val")})
    card = read_json(data_files["card"])
    subset_rows = np.load(subset_path)
    subset = torch.from_numpy(subset_rows).to(device)
    resume = resume_options(resume, model_path)
    held = job_images({"train": ([data_files["train_images"]], subset_rows),
                       "val": ([data_files["val_images"]], None)}, device, residency, resume["path"])
    images, val_images = held["train"], held["val"]  # uint8 (n, C, H, W), (n_val, C, H, W)
    labels = load_labels(data_files["train_labels"], device)[subset]
    val_labels = load_labels(data_files["val_labels"], device)
    normalize = Normalizer.load(data_files["normalization"], device)

    encoder = build_encoder(model_settings, images.shape[1])
    encoder_summary = encoder_card(encoder, model_settings, images.shape[1:])
    log.info("encoder %s", describe_encoder(encoder_summary))
    pretraining = (load_pretrained_encoder(encoder, encoder_path, model_settings) if init == "pretrained"
                   else {"objective": None, "variant": None, "pretrain_seed": None})
    linear_probe = settings["mode"] == "linear_probe"
    model = prepare(Classifier(encoder, card["num_classes"], freeze_encoder=linear_probe), device)
    runtime.compile_modules(model)  # where config compute.compile asks for it
    optimizer = adamw(model.parameters(), settings)
    total_steps = step_budget(len(images), settings)
    scheduler = warmup_cosine(optimizer, int(settings["warmup_fraction"] * total_steps), total_steps)
    eval_every = math.ceil(total_steps / settings["evaluations"])
    generator = device_generator(device, seed)
    order = BatchOrder(len(images), settings["batch_size"], generator, device)
    batches = images.batches(order)

    # ---- resume state -----------------------------------------------------------------------------
    job_settings = {"finetune": settings, "model": model_settings, "compute": compute, "init": init,
                    "label_fraction": label_fraction, "seed": seed}
    resume_file = ResumeFile(resume["path"], job_identity(
        "finetune", job_settings, {**data_files, "subset": subset_path, "encoder": encoder_path}), resume["mode"])
    done, curve, best = 0, [], {"val_accuracy": -1.0}
    running_loss = torch.zeros((), device=device)
    saved = resume_file.load()
    if saved is not None:
        done, curve, own = restore_training(saved, 0, {"model": model}, optimizer, scheduler, generator, order)
        running_loss = own["running_loss"].to(device)
        best = {**saved["best"], "state": {k: v.to(device) for k, v in saved["best"].get("state", {}).items()}}
        log.info("resuming from %s after step %d of %d", resume_file.path, done, total_steps)

    def snapshot():
        for held_images in held.values():
            held_images.check()  # no state from a run whose images were found damaged
        return (shared_state({"model": model}, optimizer, scheduler, curve=curve, best=best,
                             elapsed_seconds=clock.seconds()),
                own_state(generator, order, running_loss=running_loss.cpu()))

    checkpointer = Checkpointer("finetune", resume_file, resume, Ranks(), device,
                                lambda step: f"step {step} of {total_steps}", eval_every)
    log.info("%s %s from %s on %d labeled images (%s), %d steps, validation every %d",
             settings["mode"], init, encoder_path or "random init", len(images), subset_path,
             total_steps, eval_every)

    # ---- training loop ----------------------------------------------------------------------------
    clock = Stopwatch(device, saved["elapsed_seconds"] if saved else 0.0)
    for step in range(done + 1, total_steps + 1):
        model.train()
        batch_index, batch = batches.next()  # (B,) and uint8 (B, C, H, W) on the device
        loss = supervised_loss(model, normalize, batch, labels[batch_index], settings, generator, runtime)
        optimisation_step(loss, optimizer, scheduler)
        running_loss += loss.detach()
        if step % eval_every == 0 or step == total_steps:
            steps_since = step - (curve[-1]["step"] if curve else 0)
            val_accuracy = accuracy(model, val_images, val_labels, normalize, runtime)
            curve.append({"step": step, "train_loss": round(running_loss.item() / steps_since, 5),
                          "val_accuracy": round(val_accuracy, 5), "elapsed_seconds": round(clock.seconds(), 2)})
            running_loss.zero_()
            log.info("step %(step)d train loss %(train_loss).4f val accuracy %(val_accuracy).4f", curve[-1])
            if val_accuracy > best["val_accuracy"]:
                best = {"val_accuracy": val_accuracy, "step": step,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        checkpointer.after_step(step, loss, snapshot)

    # ---- outputs ----------------------------------------------------------------------------------
    batches.close()
    for held_images in held.values():
        held_images.finish()  # every shard's checksum verified before an output is written
    checkpointer.finish()
    save_checkpoint(model_path, {
        "model": best["state"],
        "num_classes": card["num_classes"],
        "in_channels": images.shape[1],
        "encoder_card": encoder_summary,
        "best_step": best["step"],
        "best_val_accuracy": best["val_accuracy"],
        "labeled_images": len(images),
        "config": {"finetune": settings, "model": model_settings, "init": init, **pretraining,
                   "label_fraction": label_fraction, "seed": seed},
    })
    write_curve(curve_path, curve)
    resume_file.delete()
    log.info("kept step %d, validation accuracy %.4f", best["step"], best["val_accuracy"])
    return {"best_step": best["step"], "best_val_accuracy": best["val_accuracy"]}
