"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. An online network (encoder, projector, predictor) predicts the projection of the other
view by a target network (encoder, projector) that is an exponential moving average of the online one
(§3.1); the momentum follows a cosine schedule from `base_momentum` to 1 (§3.2); the loss is the
normalised MSE, 2 - 2 cos, symmetrised over the two views (§3.1, eq. 2). Heads: 2-layer MLPs with
BatchNorm (§3.3). Without the predictor BYOL collapses (§5, Table 5a): `predictor: false` shows it."""
import torch
import torch.nn.functional as F
from torch import nn

from ssl_pipeline.objectives.common import Objective, cosine_momentum, ema_update, frozen_copy, mlp


def normalised_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target) per row (B, D), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=1)).mean()


class BYOL(Objective):
    def __init__(self, encoder, settings: dict):
        super().__init__()
        hidden, out = settings["projection_hidden_dim"], settings["projection_dim"]
        self.projector = mlp(encoder.feature_dim, hidden, out)
        self.predictor = mlp(out, settings["prediction_hidden_dim"], out) if settings["predictor"] else nn.Identity()
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)
        self.base_momentum = settings["base_momentum"]

    def forward(self, features, views, generator=None):  # (2B, F), (2B, C, H, W) -> (loss, embeddings)
        predictions = self.predictor(self.projector(features))  # (2B, D)
        with torch.no_grad():
            targets = self.target_projector(self.target_encoder(views))  # (2B, D)
        p1, p2 = predictions.chunk(2)
        t1, t2 = targets.chunk(2)
        # Each view's prediction of the other view's target (eq. 2 and its symmetrised form).
        return normalised_mse(p1, t2) + normalised_mse(p2, t1), predictions

    def after_step(self, encoder, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(self.base_momentum, step, total_steps)  # base after step 0, 1 after the last
        ema_update(self.target_encoder, encoder, momentum)
        ema_update(self.target_projector, self.projector, momentum)
