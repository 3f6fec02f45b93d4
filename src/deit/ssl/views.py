"""Augmented views of every image, made whole-batch on the device: two for SimCLR, MoCo and BYOL, one for the rest.

Per view and image, drawn from the image's seed (so resume and several
processes stay exact, as in ``data.batched``):

* a random resized crop: 20-100 % of the area, aspect 3/4-4/3, resized back
  bilinearly (small images lose too much below 20 %);
* a horizontal flip, with probability 1/2;
* with probability 0.8, brightness and contrast jitter of ±40 %, and for
  colour images saturation too;
* colour images only: grayscale with probability 0.2;
* with probability 1/2, a 3x3 Gaussian blur of sigma 0.1-2 px.

Grayscale images get no colour operation: there is no colour to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deit.data.batched import uniform_draws

_DRAWS = 12  # area, aspect, left, top, flip, jitter?, brightness, contrast, saturation, gray?, blur?, sigma
_VIEW_SALT = 0x5DEECE66D  # the second view's seeds: the image's seed mixed with this


@dataclass(frozen=True)
class TwoViews:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.8
    strength: float = 0.4
    grayscale: float = 0.2
    blur: float = 0.5

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) and seeds (B,) on the host -> normalised (2B, C, H, W): view 1, then view 2."""
        seeds = seeds.cpu()
        return torch.cat([self.view(images, seeds), self.view(images, seeds ^ _VIEW_SALT)])

    def view(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        device = images.device
        draws = uniform_draws(seeds, _DRAWS).to(device, non_blocking=True).float()
        x = resized_crops(images.float() / 255, draws[:, :5], self.scale, self.ratio, self.hflip)
        jitter = (draws[:, 5] < self.jitter).view(-1, 1, 1, 1)
        factors = 1 + self.strength * (2 * draws[:, 6:9] - 1)  # brightness, contrast, saturation in [0.6, 1.4]
        x = torch.where(jitter, _jitter(x, factors), x)
        if x.shape[1] == 3:
            gray = (draws[:, 9] < self.grayscale).view(-1, 1, 1, 1)
            x = torch.where(gray, _gray(x).expand_as(x), x)
        blur = (draws[:, 10] < self.blur).view(-1, 1, 1, 1)
        x = torch.where(blur, gaussian_blur3(x, 0.1 + 1.9 * draws[:, 11]), x)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x.clamp(0, 1) - mean) / std


def resized_crops(
    images: torch.Tensor, draws: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], hflip: float
) -> torch.Tensor:
    """A random crop of each image, resized to the full size; ``draws`` (B, 5): area, aspect, left, top, flip."""
    area = scale[0] + (scale[1] - scale[0]) * draws[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # as fractions of the side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    left = (1 - width) * draws[:, 2]
    top = (1 - height) * draws[:, 3]
    flip = torch.where(draws[:, 4] < hflip, -1.0, 1.0)
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0] = width * flip  # normalised output x in [-1, 1] -> input x inside the crop (mirrored)
    theta[:, 0, 2] = 2 * left + width - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * top + height - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True) if x.shape[1] == 3 else x


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast (about the image's mean grey), then saturation for colour images."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * brightness).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + contrast * (x - mean)).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = (gray + saturation * (x - gray)).clamp(0, 1)
    return x


def gaussian_blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A 3x3 Gaussian blur with each image's own sigma, edges repeated."""
    side = torch.exp(-1 / (2 * sigma**2))  # the weight one pixel away, relative to the centre's
    weights = torch.stack([side, torch.ones_like(side), side], dim=1) / (1 + 2 * side)[:, None]  # (B, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    height, width = x.shape[-2:]
    rows = sum(weights[:, i].view(-1, 1, 1, 1) * padded[..., i : i + height, :] for i in range(3))
    return sum(weights[:, j].view(-1, 1, 1, 1) * rows[..., j : j + width] for j in range(3))


@dataclass(frozen=True)
class OneView(TwoViews):
    """One view of every image (BEiT's input): by default a crop and a flip, without jitter or blur."""

    jitter: float = 0.0
    blur: float = 0.0

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) and seeds (B,) on the host -> normalised (B, C, H, W)."""
        return self.view(images, seeds.cpu())
