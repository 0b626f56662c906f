"""MoCo v2: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
arXiv:2003.04297, 2020, on MoCo: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised
Visual Representation Learning", CVPR 2020.

- Queries come from the online encoder and a 2-layer MLP head (v2, §2); keys from a momentum copy of
  both, updated as key <- m key + (1 - m) query (MoCo §3.2, eq. 2).
- InfoNCE over the positive key and a queue of keys from earlier batches (MoCo §3.1, eq. 1), with
  temperature 0.2 (v2, §2). After each step the batch's keys replace the oldest in the queue.
- The loss is symmetrised (each view is once the query, once the key), as solo-learn's MoCo v2+ and
  MoCo v3 (§4) do, so that both views' online forward passes, which our loop always makes, train the
  encoder; the paper's loss uses one direction.
- Shuffling BN (MoCo §3.3): the key encoder must not compute BatchNorm statistics over the same group
  of images as the queries, or the positive can be told from the negatives by those statistics. MoCo
  shuffles the keys' batch across GPUs. We do the equivalent on every device: the key batch is put in
  random order and split into `bn_splits` groups (fewer if the batch is too small for 2 views per
  group), each normalised on its own, then put back in order.
  This works the same with one process or many (under DDP with SyncBatchNorm the groups span ranks,
  still in random order).
- Under data parallelism the queue receives every rank's keys (gathered, rank 0's first), so every
  rank holds the same queue, as in MoCo's concat_all_gather before the enqueue.
"""
import torch
import torch.nn.functional as F

from ssl_pipeline.objectives.common import Objective, ema_update, frozen_copy, gather_without_gradient, mlp


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def info_nce(queries, keys, negatives, temperature: float) -> torch.Tensor:
    """queries, keys: (B, D) normalised, row i of keys is row i's positive; negatives: (K, D). In fp32
    whatever the autocast around it: logits of similar keys differ in the third decimal."""
    queries, keys, negatives = queries.float(), keys.float(), negatives.float()
    positive = (queries * keys).sum(dim=1, keepdim=True)  # (B, 1)
    negative = queries @ negatives.T  # (B, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))


class KeyQueue(torch.nn.Module):
    """A ring buffer of the last `size` keys (K, D), oldest overwritten first. Buffers, not
    parameters: saved in checkpoints and resume state, never trained."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.keys)
        keys = keys[-size:]  # a batch larger than the queue keeps its last keys
        slots = (self.position + torch.arange(len(keys), device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.position.copy_((self.position + len(keys)) % size)


class MoCoV2(Objective):
    def __init__(self, encoder, settings: dict):
        super().__init__()
        self.projector = mlp(encoder.feature_dim, settings["projection_hidden_dim"], settings["projection_dim"])
        self.key_encoder = frozen_copy(encoder)
        self.key_projector = frozen_copy(self.projector)
        self.queue = KeyQueue(settings["queue_size"], settings["projection_dim"])
        self.momentum, self.temperature = settings["momentum"], settings["temperature"]
        self.bn_splits = settings["bn_splits"]

    @torch.no_grad()
    def keys(self, views, generator) -> torch.Tensor:  # (2B, C, H, W) -> (2B, D) normalised
        def embed(images):
            return self.key_projector(self.key_encoder(images))

        # At least 2 views per group, or BatchNorm has no batch statistics; sizes differ by at most 1.
        groups = min(self.bn_splits, len(views) // 2)
        if not self.training or groups <= 1:
            return F.normalize(embed(views).float(), dim=1)
        order = torch.randperm(len(views), device=views.device, generator=generator)
        shuffled = torch.cat([embed(group) for group in torch.tensor_split(views[order], groups)])
        return F.normalize(shuffled[order.argsort()].float(), dim=1)

    def forward(self, features, views, generator=None):  # (2B, F), (2B, C, H, W) -> (loss, embeddings)
        embeddings = self.projector(features)  # (2B, D)
        queries = F.normalize(embeddings.float(), dim=1)
        keys = self.keys(views, generator)
        q1, q2 = queries.chunk(2)
        k1, k2 = keys.chunk(2)
        negatives = self.queue.keys.clone()  # the enqueue below must not change what backward sees
        loss = (info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature)) / 2
        if self.training:
            self.queue.enqueue(torch.cat([gather_without_gradient(k) for k in (k1, k2)]))
        return loss, embeddings

    def after_step(self, encoder, step: int, total_steps: int) -> None:
        ema_update(self.key_encoder, encoder, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
