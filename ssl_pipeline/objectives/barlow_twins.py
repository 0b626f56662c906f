"""Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021. The cross-correlation matrix of the two views' embeddings, each
standardised along the batch, is pulled to the identity (§2, eq. 1 and 2; Algorithm 1): on-diagonal
(1 - C_ii)^2 plus λ times the off-diagonal C_ij^2, λ = 5e-3 (§4, "Implementation details"), on a
3-layer projector.

The standardisation follows the authors' released code (facebookresearch/barlowtwins:
nn.BatchNorm1d(affine=False), eps 1e-5, SyncBatchNorm under DDP), not the exact Pearson correlation
of eq. 2: each dimension is divided by sqrt(biased variance + 1e-5). The two agree while the
embeddings' spread is large against sqrt(1e-5) and drift apart as it shrinks; on a nearly collapsed
dimension the exact correlation divides by a vanishing std and its gradient explodes (1e4 for a std of
1e-7), while the eps keeps it bounded. That code produced the published numbers, and lightly and
solo-learn do the same. Under data parallelism the embeddings are gathered and standardised over the
global batch, as SyncBatchNorm does (lightly's gather_distributed instead averages per-rank
correlations built with local statistics; tests/test_peer_losses.py shows the difference)."""
import torch

from ssl_pipeline.objectives.common import Objective, gather_from_all_ranks, mlp

# nn.BatchNorm1d's default, which the authors' code standardises with.
BATCH_NORM_EPS = 1e-5


def standardise(z: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D): each dimension centred and divided by sqrt(biased variance + eps) over the
    batch, what BatchNorm1d(affine=False) does in training mode."""
    centred = z - z.mean(dim=0)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0) + BATCH_NORM_EPS)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """(N, D) twice -> (D, D): each dimension standardised over the batch, then z1^T z2 / N. In at
    least fp32 (fp64 stays fp64)."""
    dtype = torch.promote_types(z1.dtype, torch.float32)
    return standardise(z1.to(dtype)).T @ standardise(z2.to(dtype)) / z1.shape[0]


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def barlow_twins_loss(z1, z2, off_diagonal_weight: float) -> torch.Tensor:
    """In fp32 (or fp64) whatever the autocast around it: the off-diagonal sum is a difference of two
    sums of about D, which bf16 would round by several units."""
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
