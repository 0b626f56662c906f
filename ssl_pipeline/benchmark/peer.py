"""The peer library's recipe: lightly's transforms, heads and losses (and its momentum helpers) around
our backbone, fed by a torch DataLoader, for the `lightly` rows of the speed benchmark and the race.
lightly is imported inside the functions, so that it counts in the lightly row's memory figures only.

Kept the same as ours: backbone (models.build_encoder, channels_last), batch size, AdamW and its
settings, the warm-up + cosine schedule (trainers.warmup_steps), autocast precision, the dataset's
mean/std, and the two views of every image in one backbone batch of 2B (lightly's examples call the
backbone once per view, so BatchNorm sees each view apart); the heads group the views as ours do. The
loader is the reference's (reference.TutorialDataset and data_loader: PIL images, per-sample
transforms in DataLoader workers) with lightly's transform, which yields its list of two views.

Every difference from ours, by piece:
- Transforms: SimCLRTransform (simclr), BYOLTransform (byol, and barlow_twins as lightly's Barlow
  Twins example uses it), VICRegTransform (vicreg), MoCoV2Transform (moco_v2), all set alike, so they
  draw views from one distribution; torchvision's v2 transforms, as lightly imports them (the
  reference: v1):
  - crop: lightly sets only the smallest scale, crop_scale[0]; the largest is 1 and the aspect ratio
    torchvision's (3/4, 4/3), whatever crop_scale[1] and crop_ratio say (the config's [0.3, 1.0] and
    [0.75, 1.3333] match). Antialiased bilinear resampling (ours: bilinear without antialiasing).
  - horizontal flip with p 1/2 if `flip`; vertical flip and rotation off, as ours has neither.
  - grey images: its one ColorJitter, always applied (cj_prob 1, as ours always is), brightness and
    contrast `brightness_contrast`, saturation and hue 0; it scales brightness by a factor where ours
    adds an offset (same range), and orders the two at random per image; no grey-scale step.
  - colour images: the ColorJitter takes config color_jitter (probability and the four strengths,
    cj_strength 1) and RandomGrayscale grayscale_probability; ours' brightness/contrast step on every
    view before that colour jitter has no place in lightly's transforms and is left out.
  - Gaussian blur and solarisation off (lightly's defaults blur every objective's views and solarise
    BYOL's second and VICReg's), as ours has neither; BYOL's two views are thus alike, as ours.
  - normalised with our dataset's mean/std, not lightly's ImageNet default.
  - random erasing, which none of lightly's transforms has: torchvision's RandomErasing appended to
    each of its view transforms through lightly's MultiViewTransform, after Normalize, filling with
    the normalised black so the box is black as ours (area 2-25 %, aspect 0.3-3.3 as ours; torchvision
    tries up to 10 boxes that fit, ours clamps one).
- Heads (lightly's named heads, ours' widths and layer counts). lightly's Linear before a BatchNorm has
  no bias, so trainable parameters differ from ours by exactly (h, d: hidden and output widths):
  - simclr mlp: SimCLRProjectionHead(num_layers=2, batch_norm=True), which also ends in a BatchNorm
    of the output (SimCLR v2's head) instead of the output bias: d - h. linear: lightly's
    ProjectionHead with one block, a Linear with bias, as ours: 0. none: no head, as ours: 0.
  - byol: BYOLProjectionHead and BYOLPredictionHead: -h - prediction_hidden_dim; `predictor: false`
    leaves the predictor out, as ours.
  - vicreg: VICRegProjectionHead(num_layers=3): -2 expander_dim. barlow_twins:
    BarlowTwinsProjectionHead: -2 projection_dim.
  - moco_v2: MoCoProjectionHead(num_layers=2, batch_norm=False), MoCo v2's head and lightly's
    default, without ours' hidden BatchNorm: -2 h.
  FLOPs per image are the same (the matmuls are; BatchNorm counts none), but for moco_v2, 4 d more:
  lightly's einsum for the positive logits is a batched matmul that the FLOP counter counts.
- Losses, in float32 outside autocast, as ours are:
  - simclr: NTXentLoss(temperature), the same value as ours.
  - byol: NegativeCosineSimilarity, symmetrised as lightly's example: (-cos(p1, t2) - cos(p2, t1)) / 2,
    where ours is (2 - 2 cos) summed over the two: ours = 4 + 4 x lightly's, gradients 4x (AdamW
    cancels a constant factor, up to its eps). Target momentum by cosine_schedule(step, total_steps,
    base_momentum, 1) and update_momentum after each optimiser step; it reaches 1 a step before ours.
  - vicreg: VICRegLoss(invariance, variance, covariance weights), the same formula as ours.
  - barlow_twins: BarlowTwinsLoss(off_diagonal_weight), the same formula as ours (both standardise
    each dimension by sqrt(biased variance + 1e-5), as BatchNorm does).
  - moco_v2: NTXentLoss(temperature, memory_bank_size=(queue_size, d)), key encoder and head updated
    by update_momentum with the constant `momentum`, as ours. Symmetrised as ours: one call with the
    queries of both views and the other view's keys, so the queue also takes both key batches a step,
    as ours (lightly's example uses one direction, the paper's, which runs half the encoder passes).
    Where a batch does not fit at the queue's end, lightly fills the end and restarts at slot 0,
    dropping the rest (ours wraps around); it reads the queue position to the host every step.
    No shuffled BN: lightly's batch_shuffle on one device only permutes the rows, which leaves the
    BatchNorm statistics as they are, and its SplitBatchNorm is part of its own ResNet, not of our
    backbone; so the key encoder normalises the 2B keys as one batch (ours: `bn_splits` shuffled groups).
- One process only (lightly's gather_distributed off): the benchmark has no data parallelism.
"""
import copy
import importlib.metadata
import itertools

import torch
from torch import nn

from ssl_pipeline.benchmark.data import CONSTANT_SCHEDULE_STEPS, Split, endless
from ssl_pipeline.benchmark.trainers import Trainer, pretraining_objective, warmup_steps
from ssl_pipeline.core.models import build_encoder, prepare
from ssl_pipeline.stages.preprocess import normalization_statistics
from ssl_pipeline.core.training import adamw, optimisation_step, warmup_cosine

LIGHTLY = "lightly"
ERASE_SCALE, ERASE_RATIO = (0.02, 0.25), (0.3, 3.3)  # ours' random_erase ranges
LOSS_NAMES = {"simclr": "NTXentLoss", "byol": "NegativeCosineSimilarity", "vicreg": "VICRegLoss",
              "barlow_twins": "BarlowTwinsLoss", "moco_v2": "NTXentLoss with a memory bank"}


def lightly_version() -> str:
    return importlib.metadata.version("lightly")


# ---------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------

def lightly_transform(objective: str, augment: dict, mean, std, size, channels: int):
    """lightly's two-view transform of `objective` with our augmentation settings (config
    pretrain.augment) for `channels`-channel images of `size` (H, W): PIL image -> [view, view]."""
    from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, MoCoV2Transform,
                                    SimCLRTransform, VICRegTransform)
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T

    if channels == 3:
        jitter = augment.get("color_jitter") or {"probability": 0.0}
        colour = dict(cj_prob=jitter["probability"], cj_bright=jitter.get("brightness", 0.0),
                      cj_contrast=jitter.get("contrast", 0.0), cj_sat=jitter.get("saturation", 0.0),
                      cj_hue=jitter.get("hue", 0.0), random_gray_scale=augment.get("grayscale_probability", 0.0))
    else:  # grey: only brightness and contrast, on every view, as ours
        strength = augment["brightness_contrast"]
        colour = dict(cj_prob=1.0 if strength > 0 else 0.0, cj_bright=strength, cj_contrast=strength, cj_sat=0.0,
                      cj_hue=0.0, random_gray_scale=0.0)
    height, width = size
    settings = dict(input_size=height if height == width else (height, width), cj_strength=1.0, **colour,
                    min_scale=augment["crop_scale"][0], gaussian_blur=0.0, vf_prob=0.0,
                    hf_prob=0.5 if augment["flip"] else 0.0, rr_prob=0.0,
                    normalize={"mean": list(mean), "std": list(std)})
    if objective in ("byol", "barlow_twins"):
        transform = BYOLTransform(BYOLView1Transform(**settings, solarization_prob=0.0),
                                  BYOLView2Transform(**settings, solarization_prob=0.0))
    elif objective == "vicreg":
        transform = VICRegTransform(**settings, solarize_prob=0.0)
    elif objective == "moco_v2":
        transform = MoCoV2Transform(**settings)
    else:
        transform = SimCLRTransform(**settings)
    if augment["erase_probability"] > 0:
        black = [-m / s for m, s in zip(mean, std)]  # 0 in [0, 1] units, after Normalize
        erase = T.RandomErasing(p=augment["erase_probability"], scale=ERASE_SCALE, ratio=ERASE_RATIO, value=black)
        transform = MultiViewTransform([T.Compose([view, erase]) for view in transform.transforms])
    return transform


# ---------------------------------------------------------------------------------------------------
# Heads, targets and loss
# ---------------------------------------------------------------------------------------------------

def momentum_copy(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    target = copy.deepcopy(module)
    deactivate_requires_grad(target)
    return target


def simclr_projection(feature_dim: int, settings: dict) -> nn.Module:
    from lightly.models.modules.heads import ProjectionHead, SimCLRProjectionHead

    kind = settings.get("projection", "mlp")
    if kind == "mlp":
        return SimCLRProjectionHead(feature_dim, settings["projection_hidden_dim"], settings["projection_dim"],
                                    num_layers=2, batch_norm=True)
    if kind == "linear":  # lightly has no named one-layer head; its base class builds one
        return ProjectionHead([(feature_dim, settings["projection_dim"], None, None)])
    return nn.Identity()  # the loss on the features themselves


class LightlyObjective(nn.Module):
    """lightly's heads, momentum targets and loss for one of our objectives (the module docstring says
    how each differs from ours). forward(features (2B, F), views (2B, C, H, W)) -> scalar loss."""

    def __init__(self, name: str, encoder: nn.Module, settings: dict, total_steps: int):
        super().__init__()
        from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
        from lightly.models.modules import heads

        features = encoder.feature_dim
        self.name, self.total_steps = name, total_steps
        if name == "simclr":
            self.projector = simclr_projection(features, settings)
            self.criterion = NTXentLoss(temperature=settings["temperature"])
        elif name == "byol":
            hidden, out = settings["projection_hidden_dim"], settings["projection_dim"]
            self.projector = heads.BYOLProjectionHead(features, hidden, out)
            self.predictor = (heads.BYOLPredictionHead(out, settings["prediction_hidden_dim"], out)
                              if settings["predictor"] else nn.Identity())
            self.target_encoder, self.target_projector = momentum_copy(encoder), momentum_copy(self.projector)
            self.criterion = NegativeCosineSimilarity()
            self.base_momentum = settings["base_momentum"]
        elif name == "vicreg":
            width = settings["expander_dim"]
            self.projector = heads.VICRegProjectionHead(features, width, width, num_layers=3)
            self.criterion = VICRegLoss(lambda_param=settings["invariance_weight"],
                                        mu_param=settings["variance_weight"], nu_param=settings["covariance_weight"])
        elif name == "barlow_twins":
            width = settings["projection_dim"]
            self.projector = heads.BarlowTwinsProjectionHead(features, width, width)
            self.criterion = BarlowTwinsLoss(lambda_param=settings["off_diagonal_weight"])
        elif name == "moco_v2":
            hidden, out = settings["projection_hidden_dim"], settings["projection_dim"]
            self.projector = heads.MoCoProjectionHead(features, hidden, out, num_layers=2, batch_norm=False)
            self.target_encoder, self.target_projector = momentum_copy(encoder), momentum_copy(self.projector)
            self.criterion = NTXentLoss(temperature=settings["temperature"],
                                        memory_bank_size=(settings["queue_size"], out))
            self.momentum = settings["momentum"]
        else:
            raise ValueError(f"lightly has no counterpart here of objective {name!r}")

    def loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """lightly's loss in float32 whatever the autocast around it, as ours."""
        with torch.autocast(first.device.type, enabled=False):
            return self.criterion(first.float(), second.float())

    def forward(self, features, views):  # (2B, F), (2B, C, H, W) -> loss
        if self.name in ("simclr", "vicreg", "barlow_twins"):  # the head sees each view apart, as ours
            return self.loss(*(self.projector(half) for half in features.chunk(2)))
        online = self.projector(features)  # (2B, D), as ours
        if self.name == "byol":
            online = self.predictor(online)
        with torch.no_grad():
            targets = self.target_projector(self.target_encoder(views))  # (2B, D)
        p1, p2 = online.chunk(2)
        t1, t2 = targets.chunk(2)
        if self.name == "byol":
            return 0.5 * (self.loss(p1, t2) + self.loss(p2, t1))
        # MoCo: both directions in one call, so the memory bank takes both key batches once.
        return self.loss(torch.cat([p1, p2]), torch.cat([t2, t1]))

    @torch.no_grad()
    def after_step(self, encoder: nn.Module, step: int) -> None:
        """After optimiser step `step` (0-based): the momentum targets follow the online networks."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        if self.name == "byol":
            momentum = cosine_schedule(min(step, self.total_steps - 1), self.total_steps, self.base_momentum, 1.0)
        elif self.name == "moco_v2":
            momentum = self.momentum
        else:
            return
        update_momentum(encoder, self.target_encoder, momentum)
        update_momentum(self.projector, self.target_projector, momentum)


# ---------------------------------------------------------------------------------------------------
# The measured step
# ---------------------------------------------------------------------------------------------------

def build_lightly_trainer(config: dict, train: Split, runtime, workers: int = 0, batch_size: int = None,
                          total_steps: int = CONSTANT_SCHEDULE_STEPS) -> Trainer:
    """One pretraining step of config pretrain.objective (else the first of pretrain.objectives) the
    lightly way. Built right after seeding, the backbone starts from ours' initial weights."""
    from ssl_pipeline.benchmark import reference

    device, settings = runtime.device, config["pretrain"]
    name = pretraining_objective(config)
    in_channels, size = train.images.shape[1], list(train.images.shape[2:])
    encoder = prepare(build_encoder(config["model"], in_channels), device)
    objective = LightlyObjective(name, encoder, settings[name], total_steps).to(device)
    encoder.train()
    objective.train()
    optimizer = adamw([p for module in (encoder, objective) for p in module.parameters()], settings)
    scheduler = warmup_cosine(optimizer, warmup_steps("pretrain", settings, total_steps), total_steps)
    batch_size = min(batch_size or settings["batch_size"], len(train.images))
    statistics = normalization_statistics(train.images)
    transform = lightly_transform(name, settings["augment"], statistics["mean"], statistics["std"], size,
                                  in_channels)
    loader = reference.data_loader(reference.TutorialDataset(train.images, None, transform), batch_size, workers,
                                   device)
    batches = endless(lambda: loader)
    steps = itertools.count()

    def step():
        with torch.profiler.record_function("batch"):
            views, _ = next(batches)  # lightly's list of two (B, C, H, W) views
        with torch.profiler.record_function("forward"):
            inputs = reference.to_device(torch.cat(views), device)  # (2B, C, H, W)
            with runtime.autocast():
                loss = objective(encoder(inputs), inputs)
        with torch.profiler.record_function("update"):
            optimisation_step(loss, optimizer, scheduler)
            objective.after_step(encoder, next(steps))

    return Trainer("pretrain", LIGHTLY, workers, batch_size, 2 * batch_size, (encoder, objective),
                   f"lightly {LOSS_NAMES[name]} on two views", step, loader)
