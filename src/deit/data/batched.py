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
the small-image recipe (pad-crop, flip); RandAugment and Random Erasing use
the per-image pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

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


class InMemoryBatches(Dataset):
    """uint8 images (N, C, H, W) and labels, fetched a batch at a time as (images, labels, seeds, indices)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        indices = torch.tensor([index for index, _ in keys])
        seeds = torch.tensor([seed for _, seed in keys], dtype=torch.int64)
        return self.images[indices], self.labels[indices], seeds, indices

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.__getitems__([key]))


def whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The loader's collate function: ``__getitems__`` already returns the batch."""
    return batch


@dataclass(frozen=True)
class BatchAugment:
    """Random crop with zero padding, horizontal flip and normalisation of a uint8 batch, per-image seeded."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    hflip: float = 0.5

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) and int64 seeds (B,) -> normalised float (B, C, H, W)."""
        batch, channels, height, width = images.shape
        draws = uniform_draws(seeds.to(images.device), 3)  # (B, 3): row offset, column offset, flip
        span = 2 * self.padding + 1
        rows = (draws[:, 0] * span).long().clamp(max=span - 1)[:, None] + torch.arange(height, device=images.device)
        cols = (draws[:, 1] * span).long().clamp(max=span - 1)[:, None] + torch.arange(width, device=images.device)
        flip = draws[:, 2] < self.hflip
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns right to left
        padded = F.pad(images, (self.padding,) * 4)  # zeros, as torchvision's RandomCrop(padding=...)
        picked = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        out = picked.permute(0, 3, 1, 2).float().div_(255)  # (B, H, W, C) -> (B, C, H, W)
        mean = torch.tensor(self.mean, device=images.device).view(1, channels, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, channels, 1, 1)
        return out.sub_(mean).div_(std)
