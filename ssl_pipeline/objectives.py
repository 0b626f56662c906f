"""Self-supervised objectives. Each is a module that owns its head and turns the encoder's features of
two views into a loss; add a new one to OBJECTIVES and name it in config key pretrain.objective."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherFromAllRanks(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows, summed over the ranks
    (each rank's loss depends on every rank's rows). Works on every backend, gloo included."""

    @staticmethod
    def forward(ctx, z):  # (B, D) on each rank -> (world_size * B, D), rank 0's rows first
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # (world_size * B, D) -> (B, D)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_from_all_ranks(z: torch.Tensor) -> torch.Tensor:
    """Concatenate `z` across data-parallel ranks, keeping the gradient of this rank's part, so the
    contrastive loss sees every rank's negatives as SimCLR does across devices. Identity without DDP.
    Every rank then computes the same loss over the whole global batch; the backward sum over ranks
    and DDP's average over ranks together give exactly the gradient of that one loss."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _GatherFromAllRanks.apply(z)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR). z1, z2: (B, D), row i of each is a view of
    the same image; every other row of both is a negative."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    similarity = z @ z.T / temperature  # (2B, 2B)
    similarity.fill_diagonal_(float("-inf"))
    batch = z1.shape[0]
    # Row i's positive is row i + B (and back); built on the device, since a host-to-device copy of
    # the targets would stall the GPU every step.
    positives = torch.arange(2 * batch, device=z.device).roll(batch)
    return F.cross_entropy(similarity, positives)


class SimCLR(nn.Module):
    def __init__(self, feature_dim: int, settings: dict):
        super().__init__()
        hidden, out = settings["projection_hidden_dim"], settings["projection_dim"]
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )
        self.temperature = settings["temperature"]

    def forward(self, features1, features2):  # (B, F) each -> scalar loss
        z1 = gather_from_all_ranks(self.projector(features1))
        z2 = gather_from_all_ranks(self.projector(features2))
        return nt_xent(z1, z2, self.temperature)


OBJECTIVES = {"simclr": SimCLR}


def build_objective(name: str, feature_dim: int, settings: dict) -> nn.Module:
    return OBJECTIVES[name](feature_dim, settings)
