"""MoCo (He et al., 2020; Chen et al., 2020 and 2021): queries against keys from a momentum encoder.

* v2: a 2-layer MLP head; each query's negatives are a queue of the K most
  recent keys, so a small batch still sees many negatives.
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
        self.projector = mlp(backbone.dim, hidden_dim, dim, 2 if version == 2 else 3, last_norm=version == 3)
        self.predictor = mlp(dim, hidden_dim, dim, 2) if version == 3 else nn.Identity()
        self.key_encoder = frozen_copy(nn.Sequential(backbone, self.projector))
        self.queue = KeyQueue(queue_size, dim) if version == 2 else None
        # under torchrun: every process's keys, in rank order, so that every process holds the same queue
        self.concat = concat or (lambda keys: keys)
        if version == 3 and isinstance(backbone.model, VisionTransformer):
            backbone.model.patch_embed.requires_grad_(False)

    def losses(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        q1, q2 = self.predictor(self.projector(self.backbone(views))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_encoder(views).chunk(2)
        negatives = self.queue.keys.clone() if self.queue is not None else None
        loss = (info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature)) / 2
        if self.queue is not None and self.training:
            self.queue.push(self.concat(torch.nn.functional.normalize(torch.cat([k1, k2]).float(), dim=1)))
        return {"loss": loss, "contrastive_loss": loss.detach()}

    def after_step(self, step: int) -> None:
        online = nn.Sequential(self.backbone, self.projector)
        follow(self.key_encoder, online, momentum_at(step, self.total_steps, self.base_momentum))
