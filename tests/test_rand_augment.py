"""Whole-batch RandAugment: each op against timm's PIL op, the policy's draws against timm's, and the data path."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from deit.data.batched import BatchAugment, uniform_draws
from deit.data.rand_augment import (
    INCREASING_OPS,
    BatchRandAugment,
    RandAugmentPolicy,
    apply_op,
    layer_draws,
)

PAPER_POLICY = "rand-m9-mstd0.5-inc1"
FILL = (73,)  # round(255 x Fashion-MNIST's mean), what timm's hparams img_mean gives rotations and shears


def images_like_fashion_mnist(count: int = 48, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """uint8-valued float images with a dark background, an object of smooth varied grey levels, and some texture."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(count):
        centre = torch.rand(2, generator=generator) * 0.6 - 0.3
        radius = 0.4 + 0.4 * torch.rand(1, generator=generator)
        inside = ((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) < radius**2
        shade = 80 + 150 * torch.rand(channels, 1, 1, generator=generator) * (0.6 + 0.4 * torch.cos(3 * xs + 2 * ys))
        noise = 25 * torch.rand(channels, size, size, generator=generator)
        images.append(torch.where(inside, shade + noise, noise * 0.3))
    return torch.stack(images).clamp(0, 255).floor()


def timm_op(name: str, image: torch.Tensor, level: float, sign: float, bicubic: bool, monkeypatch) -> torch.Tensor:
    """timm's op on one image, at magnitude 10 x level with the given sign and interpolation."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: -v if sign < 0 else v)
    mode = "L" if image.shape[0] == 1 else "RGB"
    array = image.byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
    args = timm_aa.LEVEL_TO_ARG[name](level * 10, {"translate_pct": 0.45}) if timm_aa.LEVEL_TO_ARG[name] else ()
    if name.startswith("Posterize") and args[0] <= 0:
        out = Image.new(mode, pil.size, 0)  # what our PIL path gives for 0 bits (deit.data.augment)
    else:
        resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
        fill = FILL[0] if mode == "L" else FILL * 3
        out = timm_aa.NAME_TO_OP[name](pil, *args, fillcolor=fill, resample=resample)
    result = torch.from_numpy(np.asarray(out).copy()).float()
    return result[None] if mode == "L" else result.permute(2, 0, 1)


def ours(name: str, images: torch.Tensor, level: float, sign: float, bicubic: bool, fill=FILL) -> torch.Tensor:
    count = len(images)
    return apply_op(
        name,
        images,
        torch.full((count,), level, dtype=torch.float64),
        torch.full((count,), sign, dtype=torch.float64),
        torch.full((count,), bicubic),
        fill,
    )


POINTWISE = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
             "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "Posterize", "Solarize", "Color",
             "Contrast", "Brightness")  # fmt: skip
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_ops_match_pillow_within_one_grey_level(name, channels, monkeypatch):
    images = images_like_fashion_mnist(channels=channels)
    fill = FILL * channels
    for level, sign in ((0.3, 1.0), (0.9, -1.0), (0.95, 1.0)):
        theirs = torch.stack([timm_op(name, image, level, sign, False, monkeypatch) for image in images])
        difference = (ours(name, images, level, sign, False, fill) - theirs).abs()
        assert difference.max() <= 1.0, (name, level, sign, difference.max())
        assert difference.mean() <= 0.05, (name, level, sign, difference.mean())


@pytest.mark.parametrize("name", ["SharpnessIncreasing", "Sharpness"])
def test_sharpness_matches_pillow_within_one_grey_level(name, monkeypatch):
    images = images_like_fashion_mnist()
    for level, sign in ((0.3, 1.0), (0.9, -1.0), (0.95, 1.0)):
        theirs = torch.stack([timm_op(name, image, level, sign, False, monkeypatch) for image in images])
        difference = (ours(name, images, level, sign, False) - theirs).abs()
        assert difference.max() <= 1.0 and difference.mean() <= 0.1, (name, level, difference.max())


@pytest.mark.parametrize("bicubic", [False, True])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_match_pillow_within_one_grey_level(name, bicubic, monkeypatch):
    """Rotations, shears and translations, bilinear and bicubic, with the fill colour brought in at the edges."""
    images = images_like_fashion_mnist()
    for level, sign in ((0.3, 1.0), (0.9, -1.0)):
        theirs = torch.stack([timm_op(name, image, level, sign, bicubic, monkeypatch) for image in images])
        assert (theirs == FILL[0]).any()  # the fill colour is part of what is compared
        difference = (ours(name, images, level, sign, bicubic) - theirs).abs()
        assert difference.max() <= 1.0 and difference.mean() <= 0.02, (name, level, sign, difference.max())


def test_the_policy_string_is_read_as_timm_reads_it():
    policy = RandAugmentPolicy.parse(PAPER_POLICY)
    assert policy == RandAugmentPolicy(magnitude=9, layers=2, prob=0.5, magnitude_std=0.5, increasing=True)
    assert policy.ops == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert RandAugmentPolicy.parse("rand-m7-n3-p0.8").ops == tuple(timm_aa._RAND_TRANSFORMS)
    assert RandAugmentPolicy.parse("rand-m9-mstd101").magnitude_std == math.inf
    assert RandAugmentPolicy.parse("rand-m9-tweights") is None  # weighted choice: left to the per-image path
    assert RandAugmentPolicy.parse("rand-mmax15") is None


def test_the_draws_follow_timms_distribution_over_20000_images():
    """Op choice, application, magnitude, sign and interpolation, against timm's own draws."""
    count = 20_000
    policy = RandAugmentPolicy.parse(PAPER_POLICY)
    draws = layer_draws(policy, uniform_draws(torch.arange(count), 2 * 6))
    assert len(draws) == 2
    random.seed(0)
    timm_magnitudes = np.array([max(0.0, min(random.gauss(9, 0.5), 10.0)) for _ in range(count)])
    for layer in draws:
        frequencies = torch.bincount(layer.op, minlength=15).double() / count
        assert (frequencies - 1 / 15).abs().max() < 5 * math.sqrt((1 / 15) * (14 / 15) / count)
        assert abs(layer.apply.double().mean() - 0.5) < 0.02
        assert abs(layer.negate.double().mean() - 0.5) < 0.02
        assert abs(layer.bicubic.double().mean() - 0.5) < 0.02
        assert abs(layer.magnitude.mean() - timm_magnitudes.mean()) < 0.02
        assert abs(layer.magnitude.std() - timm_magnitudes.std()) < 0.02
        assert layer.magnitude.max() <= 10 and (layer.magnitude == 10).double().mean() > 0.01  # clipped as timm
    # the two layers choose independently (with replacement, as timm's np.random.choice)
    same = (draws[0].op == draws[1].op).double().mean()
    assert abs(same - 1 / 15) < 0.01


def test_each_image_is_augmented_by_its_own_seed_wherever_it_is_in_the_batch():
    images = images_like_fashion_mnist(count=32).byte()
    augment = BatchAugment(mean=(0.286,), std=(0.353,), padding=3, random_erasing=0.25,
                           rand_augment=BatchRandAugment(RandAugmentPolicy.parse(PAPER_POLICY), FILL))  # fmt: skip
    seeds = torch.arange(1000, 1032)
    whole = augment(images, seeds)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = augment(images[order], seeds[order])
    torch.testing.assert_close(shuffled, whole[order])
    plain = BatchAugment(mean=(0.286,), std=(0.353,), padding=3, random_erasing=0.25)(images, seeds)
    changed = [not torch.equal(a, b) for a, b in zip(whole, plain, strict=True)]
    assert 0.5 < sum(changed) / 32 < 1.0  # most images get an op (3/4 expected), some none


def test_every_op_leaves_uint8_values():
    images = images_like_fashion_mnist(count=8, channels=3)
    for name in INCREASING_OPS:
        out = ours(name, images, 0.9, -1.0, True, FILL * 3)
        assert out.shape == images.shape and torch.equal(out, out.floor()), name
        assert out.min() >= 0 and out.max() <= 255, name
