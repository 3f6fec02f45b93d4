"""CPC (van den Oord et al., 2018; Hénaff et al., 2020): predict the encodings of the patches below.

Each image is cut into an overlapping grid of patches (``patch`` pixels,
stride ``patch // 2``: 14 px patches give a 3 x 3 grid on a 28 px image), and
the backbone encodes each patch on its own. A GRU runs down each column of the
grid, so the context at row r has seen rows 0 to r only. From it, one linear
predictor per step k (1 to ``steps``) predicts the encoding k rows below. The
loss is InfoNCE: the true encoding against every other patch of the batch.

The backbone must be a CNN: it sees patches smaller than the image, which a
ViT of fixed input size cannot take. The representation kept afterwards
(kNN monitor, linear probe, ``deit train --init``) is that CNN applied to the
whole image, where its global pooling averages over the positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import ModelError
from deit.models import VisionTransformer
from deit.ssl.backbone import Backbone
from deit.ssl.losses import flush_denormal_gradient
from deit.ssl.method import Method


class CPC(Method):
    step_input = "one view"

    def __init__(self, backbone: Backbone, *, image_size: int, patch: int | None = None, steps: int = 2) -> None:
        super().__init__()
        if isinstance(backbone.model, VisionTransformer):
            raise ModelError("CPC encodes patches smaller than the image: give a CNN backbone, e.g. resnet8_small")
        self.patch = patch or image_size // 2
        self.stride = max(1, self.patch // 2)
        self.grid = (image_size - self.patch) // self.stride + 1
        if self.grid < steps + 1:
            raise ModelError(
                f"a {self.grid} x {self.grid} grid of {self.patch} px patches cannot predict {steps} rows ahead: "
                "use smaller patches or fewer steps"
            )
        self.backbone = backbone
        self.context = nn.GRU(backbone.dim, backbone.dim, batch_first=True)
        self.predictors = nn.ModuleList(nn.Linear(backbone.dim, backbone.dim, bias=False) for _ in range(steps))

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> each patch's encoding (B, rows, columns, D)."""
        batch, channels = images.shape[:2]
        patches = images.unfold(2, self.patch, self.stride).unfold(3, self.patch, self.stride)  # (B, C, G, G, P, P)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, self.patch, self.patch)
        return self.backbone(patches).view(batch, self.grid, self.grid, -1)

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode_patches(images).float()
        batch, grid, _, dim = z.shape
        with torch.autocast(images.device.type, enabled=False):  # the recurrence and the scores in fp32
            columns = z.transpose(1, 2).reshape(batch * grid, grid, dim)  # each column, top to bottom
            context = self.context(columns)[0].view(batch, grid, grid, dim).transpose(1, 2)  # (B, row, col, D)
            candidates = z.reshape(-1, dim)  # every patch of the batch: the positive and the negatives
            index = torch.arange(batch * grid * grid, device=z.device).view(batch, grid, grid)
            total = z.new_zeros(())
            for step, predictor in enumerate(self.predictors, start=1):
                predicted = predictor(context[:, :-step]).reshape(-1, dim)  # rows 0 .. G - step - 1
                positives = index[:, step:].reshape(-1)  # the patch ``step`` rows below each
                scores = flush_denormal_gradient(predicted @ candidates.T)  # unnormalised: they grow apart
                total = total + F.cross_entropy(scores, positives)
        loss = total / len(self.predictors)
        return {"loss": loss, "contrastive_loss": loss.detach()}
