"""Pieces the objectives share: the all-gather across data-parallel ranks, MLP heads, and the
momentum (EMA) target networks of BYOL and MoCo."""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(z: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (world_size * B, D), rank 0's rows first."""
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts)


class _GatherFromAllRanks(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows, summed over the ranks
    (each rank's loss depends on every rank's rows). Works on every backend, gloo included."""

    @staticmethod
    def forward(ctx, z):  # (B, D) on each rank -> (world_size * B, D), rank 0's rows first
        return all_gather_rows(z)

    @staticmethod
    def backward(ctx, grad):  # (world_size * B, D) -> (B, D)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_from_all_ranks(z: torch.Tensor) -> torch.Tensor:
    """Concatenate `z` across data-parallel ranks, keeping the gradient of this rank's part, so a loss
    sees the whole global batch as the papers compute it across devices. Identity without DDP.
    Every rank then computes the same loss over the whole global batch; the backward sum over ranks
    and DDP's average over ranks together give exactly the gradient of that one loss."""
    if world_size() == 1:
        return z
    return _GatherFromAllRanks.apply(z)


@torch.no_grad()
def gather_without_gradient(z: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (world_size * B, D), rank 0's rows first; for targets, which need none."""
    return z if world_size() == 1 else all_gather_rows(z)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2):
    """`layers` linear layers with BatchNorm and ReLU between them, the heads of SimCLR, BYOL, MoCo v2
    (2 layers), VICReg and Barlow Twins (3)."""
    modules, width = [], in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    modules.append(nn.Linear(width, out_dim))
    return nn.Sequential(*modules)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that no optimizer trains: a momentum target starts equal to its online net."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter. BatchNorm's
    running statistics stay the target's own, gathered in its own forward passes."""
    target_parameters, online_parameters = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(target_parameters, online_parameters, 1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule (Grill et al. 2020, §3.2): tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from
    `base` at step 0 to 1 at the last step K."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0


def embedding_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension standard deviation of the L2-normalised embeddings,
    over the batch (B, D) -> scalar. A collapsed encoder maps every image to one point: 0. Embeddings
    spread evenly on the sphere give about 1 / sqrt(D)."""
    return F.normalize(features.detach().float(), dim=1).std(dim=0).mean()


# Healthy embeddings on the sphere spread about 1 / sqrt(D) per dimension; a collapsed encoder's stay
# below this share of it.
COLLAPSE_FACTOR = 0.1


def is_collapsed(std: float, dim: int) -> bool:
    """Whether an embedding std (embedding_std) of a D-dimensional embedding means collapse."""
    return std < COLLAPSE_FACTOR / math.sqrt(dim)


class Objective(nn.Module):
    """What every objective is: an nn.Module built from the encoder and its config section that owns
    its heads (trained with the encoder) and any target networks (not trained; updated in after_step).

    forward(features, views, generator) -> (scalar loss, embeddings (2B, D)). features: the online
    encoder's (2B, F) output for the standardised views (2B, C, H, W), the first view of every image
    in the first half. embeddings: this rank's online output the loss is computed on (projection,
    expansion or prediction), whose spread tells collapse (embedding_std).
    generator: the training loop's device generator, for any randomness the objective needs, so that
    it is saved in the resume state with the rest."""

    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimizer step `step` (1-based) of `total_steps` with the online encoder."""
