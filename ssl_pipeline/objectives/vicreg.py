"""VICReg: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022. Loss (§3.2, eq. 6) on a 3-layer expander (§4.3): invariance
(MSE between the two views' embeddings, weight λ = 25), variance (hinge keeping every dimension's
standard deviation at 1, eq. 1, weight μ = 25, ε = 1e-4) and covariance (squared off-diagonal
covariances over d, eq. 3 and 4, weight ν = 1), each regulariser on each branch. Under data
parallelism all three terms see the global batch, as the authors' code gathers the embeddings."""
import torch
import torch.nn.functional as F

from ssl_pipeline.objectives.common import Objective, gather_from_all_ranks, mlp


def variance_term(z: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    """(N, D) -> mean over dimensions of max(0, 1 - sqrt(Var + eps))."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + epsilon)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """(N, D) -> sum of the squared off-diagonal entries of the covariance matrix, divided by D."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    covariance = z.T @ z / (n - 1)  # (D, D)
    return (covariance.pow(2).sum() - covariance.diagonal().pow(2).sum()) / d


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def vicreg_loss(z1, z2, invariance_weight, variance_weight, covariance_weight) -> torch.Tensor:
    """In fp32 whatever the autocast around it (the covariance sums D^2 small squares). As the authors'
    code, which the weights were tuned on: invariance is the mean squared error over all N x D entries,
    the variance term the mean of the two branches', the covariance term their sum."""
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance = (variance_term(z1) + variance_term(z2)) / 2
    covariance = covariance_term(z1) + covariance_term(z2)
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


class VICReg(Objective):
    def __init__(self, encoder, settings: dict):
        super().__init__()
        self.expander = mlp(encoder.feature_dim, settings["expander_dim"], settings["expander_dim"], layers=3)
        self.weights = (settings["invariance_weight"], settings["variance_weight"], settings["covariance_weight"])

    def forward(self, features, views=None, generator=None):  # (2B, F) -> (loss, embeddings)
        embeddings = [self.expander(half) for half in features.chunk(2)]
        z1, z2 = (gather_from_all_ranks(z) for z in embeddings)
        return vicreg_loss(z1, z2, *self.weights), torch.cat(embeddings)
