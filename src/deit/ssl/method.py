"""What every self-supervised method is to the training loop: losses of a batch, and a hook after each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deit.engine import Precision
from deit.ssl.backbone import Backbone


@dataclass(frozen=True)
class EpochContext:
    """What a method may look at before an epoch (DeepCluster clusters every training image's features)."""

    images: torch.Tensor  # the training images, uint8 (N, C, H, W), in memory, on the host
    labels: torch.Tensor  # their labels, -1 where there is none: only to log how clusters match them
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    precision: Precision
    optimizer: torch.optim.Optimizer | None = None
    broadcast: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor  # rank 0's tensor on every process

    @torch.no_grad()
    def features(self, backbone: nn.Module, batch_size: int = 512) -> torch.Tensor:
        """The backbone's features (N, D) of every training image, unaugmented, in fp32 on the device."""
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        was_training = backbone.training
        backbone.eval()
        chunks = []
        for start in range(0, len(self.images), batch_size):
            images = (self.images[start : start + batch_size].to(self.device).float() / 255 - mean) / std
            with self.precision.autocast():
                chunks.append(backbone(images).float())
        backbone.train(was_training)
        return torch.cat(chunks)


class Method(nn.Module):
    """A backbone being pretrained, with the heads (and targets, queues) its method adds.

    ``losses`` takes the two views of a batch, stacked (2B, C, H, W), and
    returns ``{"loss": ...}`` and its parts. As ``step_input`` says, BEiT
    takes one view (B, C, H, W) and each image's patch mask (B, N) instead,
    and DeepCluster one view and each image's index in the training set.
    ``before_epoch`` runs before each epoch (DeepCluster's clustering) and
    returns what to add to the epoch's record. ``after_step`` runs after each
    optimizer step (momentum targets). ``backbone`` is what is kept and used
    afterwards: for the kNN monitor, the linear probe and ``deit train --init``.
    """

    backbone: Backbone
    # or "one view" (CPC, colour CMC), "view and mask" (BEiT), "view and index" (DeepCluster): see pretrain.objective
    step_input = "two views"

    def losses(self, views: torch.Tensor, *masks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, views: torch.Tensor, *masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses: the training step calls the method (or its DistributedDataParallel wrapper) on the batch."""
        return self.losses(views, *masks)

    @property
    def representation(self) -> nn.Module:
        """What the kNN monitor scores: the backbone's features; CMC's two encoders, concatenated."""
        return self.backbone

    def before_epoch(self, epoch: int, context: EpochContext) -> dict[str, Any]:
        """Nothing to do by default; DeepCluster clusters here."""
        return {}

    def describe(self) -> str | None:
        """A line for the run's log once the run has started or resumed, if the method has more to say than its
        config (BEiT: which tokenizer makes its targets)."""
        return None

    def sample_weights(self) -> torch.Tensor | None:
        """How this epoch draws the training images, read after ``before_epoch``: None, each once (the default);
        otherwise one weight per image, drawn with replacement in proportion (DeepCluster: uniform over clusters)."""
        return None

    def after_step(self, step: int) -> None:
        """Nothing to do by default: SimCLR has no target network."""

    def no_weight_decay(self) -> set[str]:
        """What the encoders' own ``no_weight_decay`` exempts (a ViT's position embedding and tokens), named here."""
        encoders = [(prefix, module) for prefix, module in self.named_modules()
                    if module is not self and hasattr(module, "no_weight_decay")]  # fmt: skip
        return {f"{prefix}.{name}" for prefix, encoder in encoders for name in encoder.no_weight_decay()}
