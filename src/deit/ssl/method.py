"""What every self-supervised method is to the training loop: losses of two views, and a hook after each step."""

from __future__ import annotations

import torch
from torch import nn

from deit.ssl.backbone import Backbone


class Method(nn.Module):
    """A backbone being pretrained, with the heads (and targets, queues) its method adds.

    ``losses`` takes the two views of a batch, stacked (2B, C, H, W), and
    returns ``{"loss": ...}`` and its parts. ``after_step`` runs after each
    optimizer step (momentum targets). ``backbone`` is what is kept and used
    afterwards: for the kNN monitor, the linear probe and ``deit train --init``.
    """

    backbone: Backbone

    def losses(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses: the training step calls the method (or its DistributedDataParallel wrapper) on the views."""
        return self.losses(views)

    def after_step(self, step: int) -> None:
        """Nothing to do by default: SimCLR has no target network."""
