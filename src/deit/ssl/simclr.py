"""SimCLR (Chen et al., 2020): pull the two views of an image together, push every other image's views away.

A projector (2 layers; 3 in SimCLRv2, ``pretrain.projector_layers``) maps the
backbone's features to the space where NT-Xent compares the 2N views of a
batch of N images at temperature tau. SimCLRv2 fine-tunes from the
projector's first layer; ``deit train --init`` keeps the backbone only, and
docs/pretraining.md says so.
"""

from __future__ import annotations

import torch

from deit.ssl.backbone import Backbone, mlp
from deit.ssl.losses import nt_xent
from deit.ssl.method import Method


class SimCLR(Method):
    def __init__(
        self, backbone: Backbone, *, dim: int = 128, hidden_dim: int = 512, layers: int = 2, temperature: float = 0.5
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.dim, hidden_dim, dim, layers)
        self.temperature = temperature

    def losses(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        z1, z2 = self.projector(self.backbone(views)).chunk(2)  # one pass: batch norm sees all 2N views
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "contrastive_loss": loss.detach()}
