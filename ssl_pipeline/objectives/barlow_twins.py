"""Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021. The cross-correlation matrix of the two views' embeddings, each
standardised along the batch, is pulled to the identity (§2, eq. 1 and 2; Algorithm 1): on-diagonal
(1 - C_ii)^2 plus λ times the off-diagonal C_ij^2, λ = 5e-3 (§4, "Implementation details"), on a
3-layer projector. Under data parallelism the correlation is over the global batch."""
import torch

from ssl_pipeline.objectives.common import Objective, gather_from_all_ranks, mlp


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """(N, D) twice -> (D, D): each dimension standardised over the batch, then z1^T z2 / N."""
    def standardise(z):
        return (z - z.mean(dim=0)) / z.std(dim=0, unbiased=False).clamp_min(1e-6)

    return standardise(z1.float()).T @ standardise(z2.float()) / z1.shape[0]


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def barlow_twins_loss(z1, z2, off_diagonal_weight: float) -> torch.Tensor:
    """In fp32 whatever the autocast around it: the off-diagonal sum is a difference of two sums of
    about D, which bf16 would round by several units."""
    correlation = cross_correlation(z1, z2)
    diagonal = correlation.diagonal()
    on_diagonal = (1 - diagonal).pow(2).sum()
    off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
    return on_diagonal + off_diagonal_weight * off_diagonal


class BarlowTwins(Objective):
    def __init__(self, encoder, settings: dict):
        super().__init__()
        self.projector = mlp(encoder.feature_dim, settings["projection_dim"], settings["projection_dim"], layers=3)
        self.off_diagonal_weight = settings["off_diagonal_weight"]

    def forward(self, features, views=None, generator=None):  # (2B, F) -> (loss, embeddings)
        embeddings = [self.projector(half) for half in features.chunk(2)]
        z1, z2 = (gather_from_all_ranks(z) for z in embeddings)
        return barlow_twins_loss(z1, z2, self.off_diagonal_weight), torch.cat(embeddings)
