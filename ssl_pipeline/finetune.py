"""Supervised fine-tuning (or a linear probe) on one labeled subset, from the pretrained encoder or
from scratch. The checkpoint kept is the one with the best validation accuracy."""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ssl_pipeline.artifacts import read_json
from ssl_pipeline.augment import supervised_view
from ssl_pipeline.data import Normalizer, device_generator, load_array, load_labels, shuffled_batches
from ssl_pipeline.inference import accuracy
from ssl_pipeline.models import Classifier, build_encoder, prepare
from ssl_pipeline.runtime import setup_runtime
from ssl_pipeline.training import (Stopwatch, adamw, load_checkpoint, optimisation_step, save_checkpoint,
                                   warmup_cosine, write_curve)

log = logging.getLogger(__name__)
INITS = ("pretrained", "scratch")


def endless_batches(num_items, batch_size, generator, device):
    while True:
        yield from shuffled_batches(num_items, batch_size, generator, device)


def load_pretrained_encoder(encoder, checkpoint_path, model_settings):
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint["config"]["model"] != model_settings:
        raise ValueError(f"{checkpoint_path} was pretrained with model settings "
                         f"{checkpoint['config']['model']}, but config key `model` is {model_settings}")
    encoder.load_state_dict(checkpoint["encoder"])


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
             label_fraction: float, seed: int, settings: dict, model_settings: dict, compute: dict) -> dict:
    """data_dir: preprocess's output directory; encoder_path: None when init is 'scratch'."""
    # ---- setup ------------------------------------------------------------------------------------
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    runtime = setup_runtime(compute, seed)
    device = runtime.device
    card = read_json(f"{data_dir}/card.json")
    subset = torch.from_numpy(np.load(subset_path)).to(device)
    images = load_array(f"{data_dir}/train_images.npy", device)[subset]  # uint8 (n, C, H, W)
    labels = load_labels(f"{data_dir}/train_labels.npy", device)[subset]
    val_images = load_array(f"{data_dir}/val_images.npy", device)
    val_labels = load_labels(f"{data_dir}/val_labels.npy", device)
    normalize = Normalizer.load(f"{data_dir}/normalization.json", device)

    encoder = build_encoder(model_settings, images.shape[1])
    if init == "pretrained":
        load_pretrained_encoder(encoder, encoder_path, model_settings)
    linear_probe = settings["mode"] == "linear_probe"
    model = prepare(Classifier(encoder, card["num_classes"], freeze_encoder=linear_probe), device)
    optimizer = adamw(model.parameters(), settings)
    total_steps = step_budget(len(images), settings)
    scheduler = warmup_cosine(optimizer, int(settings["warmup_fraction"] * total_steps), total_steps)
    eval_every = math.ceil(total_steps / settings["evaluations"])
    generator = device_generator(device, seed)
    log.info("%s %s from %s on %d labeled images (%s), %d steps, validation every %d",
             settings["mode"], init, encoder_path or "random init", len(images), subset_path,
             total_steps, eval_every)

    # ---- training loop ----------------------------------------------------------------------------
    curve, clock = [], Stopwatch(device)
    best = {"val_accuracy": -1.0}
    running_loss = torch.zeros((), device=device)
    batches = endless_batches(len(images), settings["batch_size"], generator, device)
    for step in range(1, total_steps + 1):
        model.train()
        batch_index = next(batches)
        loss = supervised_loss(model, normalize, images[batch_index], labels[batch_index], settings,
                               generator, runtime)
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

    # ---- outputs ----------------------------------------------------------------------------------
    save_checkpoint(model_path, {
        "model": best["state"],
        "num_classes": card["num_classes"],
        "in_channels": images.shape[1],
        "best_step": best["step"],
        "best_val_accuracy": best["val_accuracy"],
        "labeled_images": len(images),
        "config": {"finetune": settings, "model": model_settings, "init": init,
                   "label_fraction": label_fraction, "seed": seed},
    })
    write_curve(curve_path, curve)
    log.info("kept step %d, validation accuracy %.4f", best["step"], best["val_accuracy"])
    return {"best_step": best["step"], "best_val_accuracy": best["val_accuracy"]}
