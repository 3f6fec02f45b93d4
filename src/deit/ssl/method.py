"""What every self-supervised method is to the training loop: losses of a batch, and a hook after each step."""

from __future__ import annotations

import torch
from torch import nn

from deit.ssl.backbone import Backbone


class Method(nn.Module):
    """A backbone being pretrained, with the heads (and targets, queues) its method adds.

    ``losses`` takes the two views of a batch, stacked (2B, C, H, W), and
    returns ``{"loss": ...}`` and its parts; a method with ``needs_masks``
    (BEiT) takes one view (B, C, H, W) and each image's patch mask (B, N)
    instead. ``after_step`` runs after each
    optimizer step (momentum targets). ``backbone`` is what is kept and used
    afterwards: for the kNN monitor, the linear probe and ``deit train --init``.
    """

    backbone: Backbone
    needs_masks = False

    def losses(self, views: torch.Tensor, *masks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, views: torch.Tensor, *masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses: the training step calls the method (or its DistributedDataParallel wrapper) on the batch."""
        return self.losses(views, *masks)

    def after_step(self, step: int) -> None:
        """Nothing to do by default: SimCLR has no target network."""
