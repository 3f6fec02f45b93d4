"""Transform presets for training and evaluation.

Two families, picked by the input size:

* small images (at most 64 px: Fashion-MNIST, CIFAR): resize to the input size
  if needed, random crop with zero padding of 1/8 of the side, horizontal flip;
  evaluation only resizes.
* larger images (ImageNet-like folders): random-resized crop and flip, as the
  paper; evaluation resizes to input_size / crop_pct (256 for 224) and
  centre-crops, bicubic.

Both accept PIL images and uint8 tensors and end in a normalised float tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from deit.data import augment

SMALL_IMAGE_MAX_SIZE = 64
DEFAULT_CROP_PCT = 0.875  # 224 / 256, the paper's evaluation crop


def is_small_image(input_size: int) -> bool:
    return input_size <= SMALL_IMAGE_MAX_SIZE


def train_transform(
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    native_size: int | None = None,
    hflip: float = 0.5,
    rand_augment: str | None = None,
    random_erasing: float = 0.0,
) -> v2.Transform:
    """Crop and flip, then optionally RandAugment (on PIL images) and, after normalising, Random Erasing."""
    # RandAugment works on PIL images, so in-memory uint8 tensors go through PIL first; without it,
    # everything stays a tensor, which is several times faster for small images
    steps: list = [v2.ToPILImage()] if rand_augment else [v2.ToImage()]
    if is_small_image(input_size):
        if native_size != input_size:
            steps.append(v2.Resize(input_size, interpolation=InterpolationMode.BICUBIC, antialias=True))
            steps.append(v2.CenterCrop(input_size))
        steps.append(v2.RandomCrop(input_size, padding=max(1, input_size // 8)))
    else:
        steps.append(v2.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC, antialias=True))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rand_augment:
        steps += [augment.rand_augment(rand_augment, input_size=input_size, mean=mean), v2.ToImage()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing > 0:
        steps.append(augment.random_erasing(random_erasing))
    return v2.Compose(steps)


def eval_transform(
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    native_size: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> v2.Transform:
    steps: list[v2.Transform] = [v2.ToImage()]
    if is_small_image(input_size):
        if native_size != input_size:
            steps.append(v2.Resize(input_size, interpolation=InterpolationMode.BICUBIC, antialias=True))
            steps.append(v2.CenterCrop(input_size))
    else:
        resize = int(round(input_size / crop_pct))
        steps.append(v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True))
        steps.append(v2.CenterCrop(input_size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
