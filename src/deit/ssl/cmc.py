"""CMC (Tian et al., 2020): two views of one image, one encoder each, each view recognising its own image's other.

An image is split into two views that show different things of it:

* colour images: L against ab, the lightness and the colour of CIE Lab, as
  the paper does;
* grayscale images: the intensity against its Sobel gradients (x and y).
  There is no colour to split off, and the gradients keep the edges and the
  shape without the absolute brightness. What the two views share is then
  mostly the outline of the object, which is what its class depends on.

The gradients are a fixed function of the intensity, unlike ab of L. Cut from
the same crop, the two views then share every pixel's position, and each
image is recognised by its low-level layout: on Fashion-MNIST the features
probed around the raw pixels. So a grayscale batch holds two views of each
image made as SimCLR's, each its own crop, flip, jitter and blur
(``step_input`` "two views"); the first encoder sees the intensity of one,
the second the gradients of the other, and they must agree on what survives
a different crop. Colour images keep the paper's one crop, split into L and ab.

Each view has its own encoder (the same architecture) and a linear head. The
loss is cross-view InfoNCE in both directions. The negatives are the other
images of the batch and a queue of earlier embeddings of the other view, as
CMC's memory bank. The representation is the two encoders' features
concatenated: it feeds the kNN monitor and ``deit linear-probe``. ``deit train
--init`` takes the first encoder, which sees the L or intensity view. For
colour data, that view is repeated to three channels, so the encoder keeps the
student's input layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deit.ssl.backbone import Backbone
from deit.ssl.losses import cross_view_info_nce
from deit.ssl.method import Method
from deit.ssl.momentum import KeyQueue

SECOND_VIEW_CHANNELS = 2  # ab, or the x and y gradients


class ViewSplit(nn.Module):
    """A normalised image (B, C, H, W) -> (first view with C channels, second view with 2 channels)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.T]).unsqueeze(1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] == 1:  # intensity, and its gradients (from the normalised image: unit-ish scale)
            return images, F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), self.sobel.to(images.dtype))
        lab = rgb_to_lab((images * self.std + self.mean).clamp(0, 1))
        lightness = (lab[:, :1] - 50) / 50  # to about [-1, 1]
        return lightness.expand(-1, images.shape[1], -1, -1), lab[:, 1:] / 110


class TwoEncoders(nn.Module):
    """The representation CMC learns: both encoders' features of an image's two views, concatenated."""

    def __init__(self, first: Backbone, second: Backbone, split: ViewSplit) -> None:
        super().__init__()
        self.first, self.second, self.split = first, second, split
        self.dim = first.dim + second.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first_view, second_view = self.split(images)
        return torch.cat([self.first(first_view), self.second(second_view)], dim=1)


class CMC(Method):
    step_input = "one view"  # colour: L and ab of one crop; grayscale: "two views" (see the module's docstring)

    def __init__(
        self,
        backbone: Backbone,
        second: Backbone,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.07,
        concat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.second, self.split = backbone, second, ViewSplit(mean, std)
        if len(mean) == 1:
            self.step_input = "two views"
        self.first_head, self.second_head = nn.Linear(backbone.dim, dim), nn.Linear(second.dim, dim)
        self.first_queue, self.second_queue = KeyQueue(queue_size, dim), KeyQueue(queue_size, dim)
        self.temperature = temperature
        self.concat = concat or (lambda keys: keys)  # under torchrun: every process's embeddings, in rank order

    @property
    def representation(self) -> nn.Module:
        return TwoEncoders(self.backbone, self.second, self.split)

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two encoders' inputs: of one crop (B images), or of the two crops the batch stacks (2B)."""
        if self.step_input == "two views":
            first_crops, second_crops = images.chunk(2)  # grayscale: the first view is the image itself
            return first_crops, self.split(second_crops)[1]
        return self.split(images)

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        first_view, second_view = self.views(images)
        z1 = self.first_head(self.backbone(first_view))
        z2 = self.second_head(self.second(second_view))
        queued = (self.second_queue.keys.clone(), self.first_queue.keys.clone())
        loss = (
            cross_view_info_nce(z1, z2, queued[0], self.temperature)
            + cross_view_info_nce(z2, z1, queued[1], self.temperature)
        ) / 2
        if self.training:
            self.first_queue.push(self.concat(F.normalize(z1.detach().float(), dim=1)))
            self.second_queue.push(self.concat(F.normalize(z2.detach().float(), dim=1)))
        return {"loss": loss, "contrastive_loss": loss.detach()}


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE Lab (D65): L in [0, 100], a and b in about [-110, 110]."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = torch.tensor(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], device=rgb.device
    )
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz.to(linear.dtype), linear)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=rgb.device, dtype=xyz.dtype).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > (6 / 29) ** 3, t.clamp_min(1e-12) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness = 116 * f[:, 1:2] - 16
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([lightness, a, b], dim=1)
