"""The paper's augmentations, from timm: RandAugment, Random Erasing, Mixup / CutMix.

timm's RandAugment ``rand-m9-mstd0.5-inc1`` can ask Posterize to keep 0 bits
(its magnitude is drawn from N(9, 0.5) and clipped at 10, where the increasing
variant keeps 4 - 4 = 0 bits). Pillow before 13 turned that into a black
image; Pillow 13 raises ``ValueError: bits must be between ... 1 and 8``, about
once in a thousand images, which kills a long run hours in. ``rand_augment``
guards that one op and keeps the old result (a black image), so the policy is
the paper's on every Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

# Mixup and CutMix draw one mixing factor per batch and pair sample i with sample B-1-i
MIX_MODE = "batch"


def _posterize_keeping_zero_bits(aug_fn):
    def posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(image.mode, image.size, 0)  # what keeping no bit meant before Pillow 13
        return aug_fn(image, bits_to_keep, **kwargs)

    return posterize


def rand_augment(policy: str, *, input_size: int, mean: Sequence[float]):
    """timm's RandAugment for ``policy`` (e.g. ``rand-m9-mstd0.5-inc1``), on PIL images, with Posterize guarded."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(round(255 * m) for m in mean)
    hparams = {
        "translate_const": int(input_size * 0.45),  # timm's default for the paper's recipe: 45 % of the side
        "img_mean": fill if len(fill) > 1 else fill[0],  # fill of rotations and shears; one value for grayscale
    }
    return guard_posterize(rand_augment_transform(policy, hparams))


def guard_posterize(transform):
    """``transform`` (timm's RandAugment, alone or in a Compose) with its Posterize ops working on Pillow 13."""
    from timm.data.auto_augment import AugmentOp, posterize

    for part in getattr(transform, "transforms", [transform]):
        for op in getattr(part, "ops", []):
            if isinstance(op, AugmentOp) and op.aug_fn is posterize:
                op.aug_fn = _posterize_keeping_zero_bits(op.aug_fn)
    return transform


def random_erasing(probability: float):
    """timm's Random Erasing on a normalised (C, H, W) tensor: one box of per-pixel normal noise, as the paper."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=probability, mode="pixel", max_count=1, device="cpu")


def build_mixup(
    *, mixup: float, cutmix: float, prob: float, switch_prob: float, label_smoothing: float, num_classes: int
):
    """timm's Mixup / CutMix for whole batches, or None when both are off.

    It returns soft targets (B, classes) with label smoothing folded in, so the
    loss must not smooth them again (``losses.label_cross_entropy`` does not).
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode=MIX_MODE,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
