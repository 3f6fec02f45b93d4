"""BYOL (Grill et al., 2020): predict a slowly moving target's projection of the other view; no negatives.

The online network is backbone, projector and predictor; the target is a
momentum copy of backbone and projector, whose momentum rises from its base
(0.99 here, for short runs; 0.996 in the paper) to 1 on a cosine over the
run. Batch norm in the heads keeps the two from collapsing to a constant.
The loss is symmetric: each view's prediction regresses onto the target's
projection of the other view.
"""

from __future__ import annotations

import torch
from torch import nn

from deit.ssl.backbone import Backbone, mlp
from deit.ssl.losses import byol_loss
from deit.ssl.method import Method
from deit.ssl.momentum import follow, frozen_copy, momentum_at


class BYOL(Method):
    def __init__(
        self, backbone: Backbone, *, total_steps: int, dim: int = 128, hidden_dim: int = 512, momentum: float = 0.99
    ) -> None:
        super().__init__()
        self.total_steps, self.base_momentum = total_steps, momentum
        self.backbone = backbone
        self.projector = mlp(backbone.dim, hidden_dim, dim, 2)
        self.predictor = mlp(dim, hidden_dim, dim, 2)
        self.target = frozen_copy(nn.Sequential(backbone, self.projector))

    def losses(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        p1, p2 = self.predictor(self.projector(self.backbone(views))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(views).chunk(2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return {"loss": loss, "regression_loss": loss.detach()}

    def after_step(self, step: int) -> None:
        follow(
            self.target,
            nn.Sequential(self.backbone, self.projector),
            momentum_at(step, self.total_steps, self.base_momentum),
        )
