"""MoCo (He et al., 2020; Chen et al., 2020 and 2021): queries against keys from a momentum encoder.

* v2: a 2-layer MLP head, without batch norm as in MoCo v2; each query's
  negatives are a queue of the K most recent keys, so a small batch still
  sees many negatives. Batch norm would otherwise leak: a query and its own
  key, computed over the same batch, share its statistics, which the queued
  negatives lack, and the encoder can learn to spot that instead of the image
  (the MoCo paper's reason for Shuffling BN). So both encoders normalise in
  groups of the batch, the query encoder's in order, the key encoder's after a
  random shuffle (undone after): Shuffling BN within one process.
* v3: a projector and a predictor, no queue (the batch's other keys are the
  negatives), the loss scaled by 2 tau. For a ViT the patch projection stays
  at its random initialisation, which the v3 paper found to stabilise training.

Both are symmetric: each view is a query for the other's key. Under torchrun,
v2 queues the keys of every process, as MoCo does across GPUs. The key
encoder follows the query encoder by a momentum that rises to 1 on a cosine
over the run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deit.models import VisionTransformer
from deit.ssl.backbone import Backbone, mlp
from deit.ssl.losses import info_nce
from deit.ssl.method import Method
from deit.ssl.momentum import KeyQueue, follow, frozen_copy, momentum_at

BN_GROUPS = 8  # batch-norm groups of MoCo v2's encoders, as MoCo's 8 GPUs
MIN_BN_GROUP = 32  # views per group at the least: fewer groups for a smaller batch


def in_groups(encoder: nn.Module, views: torch.Tensor, groups: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """``encoder`` on ``groups`` consecutive slices of ``views`` (permuted by ``order``, put back after).

    Each batch norm then normalises one slice at a time, as each GPU's does in MoCo.
    """
    if groups == 1:
        return encoder(views)
    if order is not None:
        views = views[order]
    features = torch.cat([encoder(part) for part in views.chunk(groups)])
    return features if order is None else features[order.argsort()]


class MoCo(Method):
    def __init__(
        self,
        backbone: Backbone,
        *,
        version: int = 2,
        total_steps: int,
        dim: int = 128,
        hidden_dim: int = 512,
        queue_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        concat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if version not in (2, 3):
            raise ValueError(f"MoCo version {version}: choose 2 or 3")
        self.version, self.total_steps, self.base_momentum, self.temperature = (
            version,
            total_steps,
            momentum,
            temperature,
        )
        self.backbone = backbone
        if version == 2:
            self.projector = mlp(backbone.dim, hidden_dim, dim, 2, batch_norm=False)
        else:
            self.projector = mlp(backbone.dim, hidden_dim, dim, 3, last_norm=True)
        self.predictor = mlp(dim, hidden_dim, dim, 2) if version == 3 else nn.Identity()
        self.key_encoder = frozen_copy(nn.Sequential(backbone, self.projector))
        self.queue = KeyQueue(queue_size, dim) if version == 2 else None
        # under torchrun: every process's keys, in rank order, so that every process holds the same queue
        self.concat = concat or (lambda keys: keys)
        if version == 3 and isinstance(backbone.model, VisionTransformer):
            backbone.model.patch_embed.requires_grad_(False)

    def losses(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        # v3 has no queue, so nothing to leak: one batch-norm group
        groups = max(1, min(BN_GROUPS, len(views) // MIN_BN_GROUP)) if self.queue is not None else 1
        q1, q2 = self.predictor(self.projector(in_groups(self.backbone, views, groups))).chunk(2)
        with torch.no_grad():
            shuffle = torch.randperm(len(views), device=views.device) if groups > 1 else None  # seeded per step
            k1, k2 = in_groups(self.key_encoder, views, groups, shuffle).chunk(2)
        negatives = self.queue.keys.clone() if self.queue is not None else None
        loss = (info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature)) / 2
        if self.queue is not None and self.training:
            self.queue.push(self.concat(torch.nn.functional.normalize(torch.cat([k1, k2]).float(), dim=1)))
        return {"loss": loss, "contrastive_loss": loss.detach()}

    def after_step(self, step: int) -> None:
        online = nn.Sequential(self.backbone, self.projector)
        follow(self.key_encoder, online, momentum_at(step, self.total_steps, self.base_momentum))
