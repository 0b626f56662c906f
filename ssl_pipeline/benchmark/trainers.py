"""The measured steps: one optimisation step of a stage, ours or the reference (lightly's: peer.py)."""
import itertools
from dataclasses import dataclass

import torch

from ssl_pipeline.benchmark.data import CONSTANT_SCHEDULE_STEPS, IMPLEMENTATIONS, SEED, STAGES, Split, endless
from ssl_pipeline.core.data import Normalizer, device_generator, shuffled_batches
from ssl_pipeline.stages.finetune import supervised_loss
from ssl_pipeline.core.models import Classifier, build_encoder, prepare
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.stages.pretrain import contrastive_loss
from ssl_pipeline.core.training import adamw, optimisation_step, warmup_cosine


# ---------------------------------------------------------------------------------------------------
# The measured steps: one optimisation step of a stage, ours or the reference
# ---------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    stage: str
    implementation: str
    workers: int  # DataLoader worker processes (0 for ours, which has no loader)
    batch_size: int  # images drawn per step
    images_per_step: int  # images the model sees per step: both views count in pretraining
    modules: tuple  # what the step trains: (encoder, objective) or (classifier,)
    loss_name: str
    # () -> None: one optimisation step, in three phases the profiler sees (torch.profiler labels):
    # "batch" takes the next batch (the reference's loader loads and augments it here), "forward" runs
    # the model and the loss (ours augments here, on the device), "update" is backward and AdamW.
    step: object
    loader: object = None  # the reference's (or lightly's) DataLoader


def pretraining_objective(config: dict) -> str:
    """The objective a pretraining measurement uses: pretrain.objective where measured_steps set it,
    else the first of config pretrain.objectives."""
    return config["pretrain"].get("objective", config["pretrain"]["objectives"][0])


def warmup_steps(stage: str, settings: dict, total_steps: int) -> int:
    """The pipeline's warm-up share of a schedule of `total_steps` (pretrain.py, finetune.py); none in
    the benchmark's constant schedule. settings: config pretrain or finetune."""
    if total_steps >= CONSTANT_SCHEDULE_STEPS:
        return 0
    share = settings["warmup_epochs"] / settings["epochs"] if stage == "pretrain" else settings["warmup_fraction"]
    return int(share * total_steps)


def build_trainer(stage: str, implementation: str, config: dict, train: Split, runtime, workers: int = 0,
                  batch_size: int = None, total_steps: int = CONSTANT_SCHEDULE_STEPS) -> Trainer:
    """Model, loss, optimiser and batch size come from the config and are built the same way for ours
    and the reference (and, after the same seed, with the same initial weights); only how batches are
    made differs. "lightly" (pretraining only) is peer.build_lightly_trainer. total_steps: length of
    the warm-up + cosine schedule and of BYOL's momentum schedule; the default keeps both constant."""
    if stage not in STAGES or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"stage must be one of {STAGES} and implementation one of {IMPLEMENTATIONS}")
    if implementation == "lightly":
        if stage != "pretrain":
            raise ValueError("lightly has pretraining rows only")
        from ssl_pipeline.benchmark.peer import build_lightly_trainer  # imports lightly only when asked for

        return build_lightly_trainer(config, train, runtime, workers, batch_size, total_steps)
    device = runtime.device
    settings = config[stage]
    in_channels, image_shape = train.images.shape[1], train.images.shape[1:]
    if stage == "pretrain":
        encoder = prepare(build_encoder(config["model"], in_channels), device)
        name = pretraining_objective(config)
        objective = build_objective(name, encoder, settings[name]).to(device)
        modules, loss_name = (encoder, objective), f"{name} on two views"
    else:
        num_classes = int(train.labels.max()) + 1
        model = prepare(Classifier(build_encoder(config["model"], in_channels), num_classes,
                                   freeze_encoder=settings["mode"] == "linear_probe"), device)
        modules = (model,)
        loss_name = f"cross entropy, label smoothing {settings['label_smoothing']}"
    for module in modules:
        module.train()
    optimizer = adamw([p for module in modules for p in module.parameters()], settings)
    scheduler = warmup_cosine(optimizer, warmup_steps(stage, settings, total_steps), total_steps)
    batch_size = min(batch_size or settings["batch_size"], len(train.images))
    pixel_statistics = normalization_statistics(train.images)
    mean, std = pixel_statistics["mean"], pixel_statistics["std"]
    views = 2 if stage == "pretrain" else 1
    trainer = Trainer(stage, implementation, workers if implementation == "reference" else 0, batch_size,
                      views * batch_size, modules, loss_name, step=None)

    if implementation == "ours":
        # The pipeline's loop: the dataset on the device as uint8, once; batches cut and augmented there.
        images = torch.from_numpy(train.images).to(device)  # uint8 (N, C, H, W)
        labels = torch.from_numpy(train.labels).to(device)
        normalize = Normalizer(pixel_statistics, device)
        generator = device_generator(device, SEED)
        batches = endless(lambda: shuffled_batches(len(images), batch_size, generator, device))

        def batch_loss():
            with torch.profiler.record_function("batch"):
                index = next(batches)
            with torch.profiler.record_function("forward"):
                if stage == "pretrain":
                    return contrastive_loss(encoder, objective, normalize, images[index], settings["augment"],
                                            generator, runtime)[0]
                return supervised_loss(model, normalize, images[index], labels[index], settings, generator,
                                       runtime)
    else:
        # The tutorial recipe: per-sample PIL transforms in DataLoader workers. Imported here so that
        # torchvision and PIL count in the reference's memory figures, not in ours.
        from ssl_pipeline.benchmark import reference

        size = list(image_shape[1:])
        if stage == "pretrain":
            view = reference.contrastive_transform(settings["augment"], mean, std, size, in_channels)
            transform = reference.TwoViews(view)
        else:
            transform = reference.supervised_transform(settings["augment"], mean, std, size)
        dataset = reference.TutorialDataset(train.images, train.labels, transform)
        trainer.loader = reference.data_loader(dataset, batch_size, workers, device)
        batches = endless(lambda: trainer.loader)

        def batch_loss():
            with torch.profiler.record_function("batch"):
                inputs, targets = next(batches)
            with torch.profiler.record_function("forward"):
                if stage == "pretrain":
                    return reference.contrastive_loss(encoder, objective, inputs, runtime)
                return reference.supervised_loss(model, inputs, targets, settings["label_smoothing"], runtime)

    steps = itertools.count(1)

    def step():
        loss = batch_loss()
        with torch.profiler.record_function("update"):
            optimisation_step(loss, optimizer, scheduler)
            if stage == "pretrain":  # momentum targets, where any, after step 1, 2, ... of total_steps
                objective.after_step(encoder, next(steps), total_steps)

    trainer.step = step
    return trainer


def parameter_count(trainer: Trainer) -> int:
    return sum(p.numel() for module in trainer.modules for p in module.parameters() if p.requires_grad)
