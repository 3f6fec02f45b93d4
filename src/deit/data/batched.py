"""Whole-batch augmentation for data sets held in memory (Fashion-MNIST, CIFAR).

The per-image pipeline decodes, crops and flips one image at a time in
Python; for 28–32 px images that costs as much as a small model's step. Here
the loader only gathers a uint8 batch (one indexing operation) and the crop
with zero padding, the flip and the normalisation run on the whole batch, on
the training device, in a few tensor operations.

Each image's crop offset and flip come from its own seed (the sampler's
per-position seed), through a small counter-based generator evaluated for
the whole batch at once, so the result does not depend on the batch, the
process or the device: resume and multi-process runs stay exact. It covers
the small-image recipe (pad-crop, flip), RandAugment (``data.rand_augment``)
and Random Erasing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deit.data.batch import Batch
from deit.data.rand_augment import BatchRandAugment

_MODULUS = 2**31 - 1  # the Park–Miller generator: x -> 48271 x mod (2^31 - 1); products stay below 2^47
_MULTIPLIER = 48271


def uniform_draws(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) uniforms in (0, 1), the i-th column the i-th draw of each seed's own stream."""
    state = seeds.remainder(_MODULUS - 1) + 1
    draws = []
    for _ in range(count + 1):  # the first step only mixes the seed in
        state = (state * _MULTIPLIER).remainder(_MODULUS)
        draws.append(state.double() / _MODULUS)
    return torch.stack(draws[1:], dim=1)


def hashed_normals(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) standard normals, the i-th a hash of (seed, i): per-image noise that needs no generator state."""
    counters = seeds[:, None].remainder(2**31) * (2 * count) + torch.arange(2 * count, device=seeds.device)
    bits = counters & 0xFFFFFFFF
    for _ in range(3):  # an xor-shift-multiply mixer; 32-bit values times a 27-bit constant stay inside int64
        bits = ((bits ^ (bits >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    bits = bits ^ (bits >> 16)
    uniform = (bits.double() + 0.5) / 2**32  # (B, 2 count) in (0, 1)
    radius = torch.sqrt(-2 * torch.log(uniform[:, :count]))
    return (radius * torch.cos(2 * math.pi * uniform[:, count:])).float()  # Box–Muller


class InMemoryBatches(Dataset):
    """uint8 images (N, C, H, W) and labels, fetched a batch at a time as a ``Batch`` with seeds."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Batch:
        indices = torch.tensor([index for index, _ in keys])
        seeds = torch.tensor([seed for _, seed in keys], dtype=torch.int64)
        return Batch(self.images[indices], self.labels[indices], indices, seeds)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        return Batch(*(part[0] for part in self.__getitems__([key])))


# Random Erasing's box, as timm draws it: area 2-33 % of the image, aspect ratio 0.3-3.3 (log-uniform),
# up to 10 tries for a box that fits
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10
_CROP_DRAWS = 3  # row offset, column offset, flip


@dataclass(frozen=True)
class BatchAugment:
    """Random crop with zero padding, horizontal flip, normalisation and Random Erasing of a uint8 batch.

    Every random choice is drawn from the image's own seed.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    hflip: float = 0.5
    random_erasing: float = 0.0  # probability of one erased box of normal noise per image (timm's "pixel" mode)
    rand_augment: BatchRandAugment | None = None  # after the crop and flip, before normalising (timm's order)

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on the device and int64 seeds (B,) -> normalised float (B, C, H, W).

        The draws are made on the host, where the seeds arrive: the device never waits for a choice.
        """
        batch, channels, height, width = images.shape
        device = images.device
        erase_draws = 1 + 4 * ERASE_TRIES if self.random_erasing > 0 else 0
        extra = self.rand_augment.draws_per_image if self.rand_augment is not None else 0
        draws = uniform_draws(seeds.cpu(), _CROP_DRAWS + erase_draws + extra)  # (B, draws) on the host
        crop = draws[:, :_CROP_DRAWS].to(device, non_blocking=True)
        span = 2 * self.padding + 1
        rows = (crop[:, 0] * span).long().clamp(max=span - 1)[:, None] + torch.arange(height, device=device)
        cols = (crop[:, 1] * span).long().clamp(max=span - 1)[:, None] + torch.arange(width, device=device)
        flip = crop[:, 2] < self.hflip
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns right to left
        padded = F.pad(images, (self.padding,) * 4)  # zeros, as torchvision's RandomCrop(padding=...)
        picked = padded[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        out = picked.permute(0, 3, 1, 2).float()  # (B, H, W, C) -> (B, C, H, W), values 0-255
        if self.rand_augment is not None:  # on uint8 values, as timm's on PIL images: after the crop, before scaling
            out = self.rand_augment(out, draws[:, _CROP_DRAWS + erase_draws :])
        mean = torch.tensor(self.mean, device=device).view(1, channels, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, channels, 1, 1)
        out = out.div_(255).sub_(mean).div_(std)
        if self.random_erasing > 0:
            erase = draws[:, _CROP_DRAWS : _CROP_DRAWS + erase_draws].to(device, non_blocking=True)
            out = self._erase(out, seeds.to(device, non_blocking=True), erase)
        return out

    def _erase(self, images: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Replace one box per chosen image with normal noise; ``draws`` (B, 1 + 4 tries) are the image's uniforms."""
        batch, channels, height, width = images.shape
        tries = draws[:, 1:].double().view(batch, ERASE_TRIES, 4)  # area, aspect, top, left
        area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * tries[..., 0])
        aspect = torch.exp(ERASE_LOG_ASPECT[0] + (ERASE_LOG_ASPECT[1] - ERASE_LOG_ASPECT[0]) * tries[..., 1])
        box_h = torch.sqrt(area * aspect).round().long()  # (B, tries)
        box_w = torch.sqrt(area / aspect).round().long()
        fits = (box_h < height) & (box_w < width)
        first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits, as timm's loop takes it
        erase = (draws[:, 0] < self.random_erasing) & fits.any(dim=1)
        box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
        top = (tries[..., 2].gather(1, first)[:, 0] * (height - box_h + 1)).long()
        left = (tries[..., 3].gather(1, first)[:, 0] * (width - box_w + 1)).long()
        rows = torch.arange(height, device=images.device)[None, :]
        cols = torch.arange(width, device=images.device)[None, :]
        inside_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
        inside_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
        box = (inside_rows[:, :, None] & inside_cols[:, None, :] & erase[:, None, None])[:, None]  # (B, 1, H, W)
        noise = hashed_normals(seeds, channels * height * width).view_as(images)
        return torch.where(box, noise, images)
