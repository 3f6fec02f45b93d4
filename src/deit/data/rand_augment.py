"""RandAugment on whole batches of images, on the training device: timm's policy, drawn per image.

timm's RandAugment (``rand-m9-mstd0.5-inc1`` in the paper's recipe) works on
one PIL image at a time, in loader workers. For 28–32 px images that costs
more than the model's step on a 2-core machine. Here the same distribution is
drawn for every image of a batch at once, and each op runs on the images that
drew it, as tensor operations on the device.

What each image draws, per layer (2 by default), as timm does:

* an op, uniformly among the policy's 15 (with replacement across layers);
* whether to apply it (probability 0.5);
* a magnitude, N(m, mstd) clipped to [0, 10];
* the sign of signed ops (rotate, shear, translate, the increasing enhancers);
* for geometric ops, bilinear or bicubic interpolation, each with probability 1/2.

Every draw comes from the image's seed (see ``data.batched``), so an image is
augmented the same way whatever batch, process or device it lands on.

Images are float tensors holding the uint8 values 0–255; each op rounds and
clips as Pillow stores uint8, so the chain of two ops matches Pillow's. Ops
follow Pillow's definitions (``ImageOps``, ``ImageEnhance``, affine transforms
with pixel centres at +0.5 and the fill colour outside the source image).
What differs, and stays within the tolerances ``tests/test_rand_augment.py``
states: bicubic interpolation uses torch's kernel (a = -0.75) where Pillow's
uses a = -1, and a few roundings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# timm's _RAND_INCREASING_TRANSFORMS and _RAND_TRANSFORMS, in timm's order
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
ORIGINAL_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10] and scaled by 1/10
TRANSLATE_FRACTION = 0.45  # timm's translate_pct: TranslateXRel at level 10 moves 45 % of the side
DRAWS_PER_LAYER = 6  # op, apply, two uniforms for the magnitude's normal, sign, interpolation


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm RandAugment string (``rand-m9-mstd0.5-inc1``) as numbers."""

    magnitude: float = 10.0
    layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS

    @classmethod
    def parse(cls, text: str) -> RandAugmentPolicy | None:
        """The policy ``text`` names, or None where it uses what this module does not draw (weights, mmax)."""
        parts = text.split("-")
        if parts[0] != "rand":
            return None
        values: dict[str, float] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d+)?)", part)
            if match is None:
                return None  # t<set>, mmax, or something timm may add
            values[match.group(1)] = float(match.group(2))
        std = values.get("mstd", 0.0)
        return cls(
            magnitude=values.get("m", MAX_LEVEL),
            layers=int(values.get("n", 2)),
            prob=values.get("p", 0.5),
            magnitude_std=math.inf if std > 100 else std,
            increasing=bool(values.get("inc", 0)),
        )


@dataclass(frozen=True)
class LayerDraws:
    """One layer's draws for a batch, one entry per image."""

    op: torch.Tensor  # index into the policy's ops
    apply: torch.Tensor  # bool
    magnitude: torch.Tensor  # in [0, 10]
    negate: torch.Tensor  # bool: the signed ops' sign
    bicubic: torch.Tensor  # bool: geometric ops interpolate bicubically, else bilinearly


def layer_draws(policy: RandAugmentPolicy, uniforms: torch.Tensor) -> list[LayerDraws]:
    """Each layer's draws from (B, layers x DRAWS_PER_LAYER) uniforms in (0, 1)."""
    layers = []
    for layer in range(policy.layers):
        u = uniforms[:, layer * DRAWS_PER_LAYER : (layer + 1) * DRAWS_PER_LAYER].double()
        if policy.magnitude_std == math.inf:
            magnitude = u[:, 2] * policy.magnitude
        elif policy.magnitude_std > 0:
            normal = torch.sqrt(-2 * torch.log(u[:, 2])) * torch.cos(2 * math.pi * u[:, 3])  # Box–Muller
            magnitude = policy.magnitude + policy.magnitude_std * normal
        else:
            magnitude = torch.full_like(u[:, 2], policy.magnitude)
        layers.append(
            LayerDraws(
                op=(u[:, 0] * len(policy.ops)).long().clamp(max=len(policy.ops) - 1),
                apply=u[:, 1] <= policy.prob,  # timm skips the op when random() > prob
                magnitude=magnitude.clamp(0.0, MAX_LEVEL),
                negate=u[:, 4] > 0.5,  # timm's _randomly_negate
                bicubic=u[:, 5] < 0.5,
            )
        )
    return layers


@dataclass(frozen=True)
class BatchRandAugment:
    """Apply ``policy`` to float (B, C, H, W) images holding 0–255, given each image's uniforms."""

    policy: RandAugmentPolicy
    fill: tuple[float, ...]  # per channel, 0–255: what rotations, shears and translations bring in (timm: the mean)

    @property
    def draws_per_image(self) -> int:
        return self.policy.layers * DRAWS_PER_LAYER

    def __call__(self, images: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """``uniforms`` (B, draws_per_image) live on the host, so choosing which images get which op never waits
        for the device."""
        images = images.clone()
        for draws in layer_draws(self.policy, uniforms.cpu()):
            for index, name in enumerate(self.policy.ops):
                chosen = ((draws.op == index) & draws.apply).nonzero()[:, 0]
                if len(chosen) == 0:
                    continue
                rows = chosen.to(images.device, non_blocking=True)
                level = draws.magnitude[chosen] / MAX_LEVEL
                sign = torch.where(draws.negate[chosen], -1.0, 1.0).double()
                images[rows] = apply_op(name, images[rows], level, sign, draws.bicubic[chosen], self.fill)
        return images


def apply_op(
    name: str,
    images: torch.Tensor,
    level: torch.Tensor,
    sign: torch.Tensor,
    bicubic: torch.Tensor,
    fill: Sequence[float],
) -> torch.Tensor:
    """Op ``name`` at ``level`` (magnitude / 10, per image, on the host) on float 0–255 images."""
    device = images.device

    def per_image(values: torch.Tensor) -> torch.Tensor:  # (n,) host doubles -> (n, 1, 1, 1) on the device
        return values.float().to(device, non_blocking=True).view(-1, 1, 1, 1)

    if name == "AutoContrast":
        return auto_contrast(images)
    if name == "Equalize":
        return equalize(images)
    if name == "Invert":
        return 255.0 - images
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = (level * 4).floor()  # timm: int(level * 4) bits, or 4 - that for the increasing variant
        return posterize(images, per_image(4 - bits if name == "PosterizeIncreasing" else bits))
    if name in ("Solarize", "SolarizeIncreasing"):
        threshold = (level * 256).floor().clamp(max=256)
        return solarize(images, per_image(256 - threshold if name == "SolarizeIncreasing" else threshold))
    if name == "SolarizeAdd":
        return solarize_add(images, per_image((level * 110).floor().clamp(max=128)))
    if name.endswith("Increasing"):  # the enhancers: factor 1 is the image, moving away both ways increases
        factor = (1.0 + sign * level * 0.9).clamp(min=0.1)
        return ENHANCERS[name.removesuffix("Increasing")](images, per_image(factor))
    if name in ENHANCERS:
        return ENHANCERS[name](images, per_image(level * 1.8 + 0.1))
    height, width = images.shape[-2:]
    # the affine map from output to input coordinates (pixel centres at +0.5), Pillow's (a, b, c, d, e, f)
    n = len(level)
    matrix = torch.zeros(n, 2, 3, dtype=torch.float64)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
    if name == "Rotate":
        angle = -torch.deg2rad(sign * level * 30.0)  # Pillow turns counter-clockwise; the map is the inverse
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = width / 2, height / 2
        matrix[:, 0] = torch.stack([cos, sin, cx - cos * cx - sin * cy], dim=1)
        matrix[:, 1] = torch.stack([-sin, cos, cy + sin * cx - cos * cy], dim=1)
    elif name == "ShearX":
        matrix[:, 0, 1] = sign * level * 0.3
    elif name == "ShearY":
        matrix[:, 1, 0] = sign * level * 0.3
    elif name == "TranslateXRel":
        matrix[:, 0, 2] = sign * level * TRANSLATE_FRACTION * width
    elif name == "TranslateYRel":
        matrix[:, 1, 2] = sign * level * TRANSLATE_FRACTION * height
    else:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return affine(images, matrix, bicubic, fill)


def _uint8(values: torch.Tensor) -> torch.Tensor:
    """Pillow stores every intermediate image as uint8: truncate and clip."""
    return values.floor().clamp_(0.0, 255.0)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: each channel's darkest value to 0 and brightest to 255 (constant channels unchanged)."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    scale = 255.0 / (high - low).clamp(min=1.0)
    stretched = _uint8((images - low) * scale)
    return torch.where(high > low, stretched, images)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: each channel's histogram spread evenly, with Pillow's integer steps."""
    n, channels = images.shape[:2]
    values = images.long().flatten(2)  # (n, C, H*W)
    counts = torch.zeros(n, channels, 256, dtype=torch.long, device=images.device)
    counts.scatter_add_(2, values, torch.ones_like(values))
    last = 255 - (counts.flip(-1) > 0).long().argmax(dim=-1, keepdim=True)  # the brightest value present
    step = (counts.sum(-1, keepdim=True) - counts.gather(-1, last)) // 255
    before = counts.cumsum(-1) - counts  # pixels darker than each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    identity = torch.arange(256, device=images.device).expand_as(lut)
    # one value, or too few pixels below the brightest for a step: Pillow leaves the channel as it is
    lut = torch.where(step > 0, lut, identity)
    return lut.gather(2, values).view_as(images).float()


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits of each value; 0 bits gives black (Pillow before 13, and our PIL guard)."""
    step = torch.pow(2.0, 8 - bits)
    return torch.where(bits > 0, (images / step).floor() * step, torch.zeros_like(images))


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= threshold, 255.0 - images, images)


def solarize_add(images: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    return torch.where(images < 128, (images + added).clamp(max=255.0), images)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor), as ImageEnhance does: truncated to uint8."""
    return _uint8(degenerate + factor * (images - degenerate))


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point), kept as one channel."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([19595.0, 38470.0, 7471.0], device=images.device).view(1, 3, 1, 1)
    return ((images * weights).sum(1, keepdim=True) + 32768).div(65536).floor()


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_luma(images).expand_as(images), images, factor)  # a grayscale image is its own degenerate


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = (_luma(images).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean.expand_as(images), images, factor)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(images), images, factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # ImageFilter.SMOOTH


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with ImageFilter.SMOOTH's output, whose one-pixel border Pillow leaves unfiltered."""
    channels = images.shape[1]
    kernel = _SMOOTH.to(images.device).expand(channels, 1, 3, 3)
    smooth = (F.conv2d(images, kernel, groups=channels) + 0.5).floor().clamp(0.0, 255.0)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, images, factor)


ENHANCERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
}


def affine(images: torch.Tensor, matrix: torch.Tensor, bicubic: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Pillow's affine transform: output pixel centre p reads the input at ``matrix @ (p, 1)``.

    Inside the input, the value is interpolated with edge pixels repeated;
    outside it, the pixel takes the fill colour.
    """
    n, channels, height, width = images.shape
    device = images.device
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).double().view(1, -1, 3)  # (1, H*W, 3)
    source = points @ matrix.transpose(1, 2)  # (n, H*W, 2) input coordinates
    inside = (source[..., 0] >= 0) & (source[..., 0] < width) & (source[..., 1] >= 0) & (source[..., 1] < height)
    out = torch.empty_like(images)
    linear, cubic = (chosen.nonzero()[:, 0].to(device, non_blocking=True) for chosen in (~bicubic, bicubic))
    if len(linear):
        grid = torch.stack([source[..., 0] / width * 2 - 1, source[..., 1] / height * 2 - 1], dim=-1)
        grid = grid.float().view(n, height, width, 2).to(device, non_blocking=True)
        sampled = F.grid_sample(
            images[linear], grid[linear], mode="bilinear", padding_mode="border", align_corners=False
        )
        out[linear] = _uint8(sampled)
    if len(cubic):
        out[cubic] = _uint8(_pillow_bicubic(images[cubic], source.float().to(device, non_blocking=True)[cubic]))
    colour = torch.tensor(fill, dtype=images.dtype, device=device).view(1, channels, 1, 1)
    inside = inside.view(n, 1, height, width).to(device, non_blocking=True)
    return torch.where(inside, out, colour.expand_as(out))


def _pillow_bicubic(images: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic sampling (cubic convolution with a = -1, edge pixels repeated) at ``source`` (n, H*W, 2)."""
    n, channels, height, width = images.shape
    centred = source - 0.5  # pixel centres sit at +0.5
    base = centred.floor()
    frac = centred - base  # (n, H*W, 2)
    taps = torch.arange(-1, 3, device=images.device)
    xs = (base[..., :1].long() + taps).clamp(0, width - 1)  # (n, H*W, 4)
    ys = (base[..., 1:].long() + taps).clamp(0, height - 1)
    index = (ys[..., :, None] * width + xs[..., None, :]).flatten(2)  # (n, H*W, 16): row-major 4 x 4 taps
    flat = images.flatten(2)  # (n, C, H*W)
    values = flat.gather(2, index.flatten(1)[:, None].expand(-1, channels, -1)).view(n, channels, -1, 4, 4)

    def weights(d: torch.Tensor) -> torch.Tensor:  # (n, H*W) -> (n, 1, H*W, 4), Pillow's BICUBIC macro
        return torch.stack([-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3, d + d**2 - d**3, -(d**2) + d**3], -1)[:, None]

    rows = (values * weights(frac[..., 0])[..., None, :]).sum(-1)  # along x first, as Pillow: (n, C, H*W, 4)
    return (rows * weights(frac[..., 1])).sum(-1).view(n, channels, height, width)
