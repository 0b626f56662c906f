"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020. NT-Xent loss (§2.1, eq. 1) on a 2-layer MLP projection head (§2.1, §4.2);
under data parallelism the negatives come from every device (§2.2: the global batch).

config pretrain.simclr.projection chooses the head of §4.2 (Figure 8): mlp (the paper's, and the
default), linear (one linear layer), or none (the loss on the encoder's features themselves). The
paper finds mlp > linear > none in linear evaluation of the features before the head."""
import torch
import torch.nn.functional as F
from torch import nn

from ssl_pipeline.objectives.common import Objective, gather_from_all_ranks, mlp


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy. z1, z2: (B, D), row i of each is a view of the same
    image; every other row of both is a negative."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    similarity = z @ z.T / temperature  # (2B, 2B)
    similarity.fill_diagonal_(float("-inf"))
    batch = z1.shape[0]
    # Row i's positive is row i + B (and back); built on the device, since a host-to-device copy of
    # the targets would stall the GPU every step.
    positives = torch.arange(2 * batch, device=z.device).roll(batch)
    return F.cross_entropy(similarity, positives)


PROJECTIONS = {
    "mlp": lambda features, settings: mlp(features, settings["projection_hidden_dim"], settings["projection_dim"]),
    "linear": lambda features, settings: nn.Linear(features, settings["projection_dim"]),
    "none": lambda features, settings: nn.Identity(),
}


class SimCLR(Objective):
    def __init__(self, encoder, settings: dict):
        super().__init__()
        self.projector = PROJECTIONS[settings.get("projection", "mlp")](encoder.feature_dim, settings)
        self.temperature = settings["temperature"]

    def forward(self, features, views=None, generator=None):  # (2B, F) -> (loss, embeddings)
        # The head sees each view as its own batch (BatchNorm statistics per view), and each view is
        # gathered on its own, so the global batch keeps its views apart.
        projections = [self.projector(half) for half in features.chunk(2)]
        z1, z2 = (gather_from_all_ranks(z) for z in projections)
        return nt_xent(z1, z2, self.temperature), torch.cat(projections)
