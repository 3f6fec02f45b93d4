"""Named model variants and ``create_model``.

Our own transformers are listed in ``VARIANTS``; any other name is looked up
in timm, which is how CNN teachers (``resnet18``, ``regnety_160``, ...) are
built. Prefix a name with ``timm:`` to force timm's implementation.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

import torch
from torch import nn

from deit.errors import ModelError
from deit.models.cnn import SMALL_RESNETS, create_small_resnet
from deit.models.pos_embed import load_adapted
from deit.models.vit import VisionTransformer, ViTConfig

log = logging.getLogger("deit")

# width, depth, heads of each size; tiny/small/base are the paper's Table 1
_SIZES = {
    "pico": (64, 4, 2),
    "nano": (128, 6, 4),
    "micro": (192, 6, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
# (patch size, input size): the paper's ImageNet resolutions, and 28 / 32 px for MNIST-like and CIFAR data
_PAPER_GRIDS = ((16, 224), (16, 384))
_SMALL_IMAGE_GRIDS = ((4, 28), (7, 28), (4, 32), (8, 32))


def _variants() -> dict[str, ViTConfig]:
    variants = {}
    for size, (dim, depth, heads) in _SIZES.items():
        grids = _PAPER_GRIDS if size in ("tiny", "small", "base") else _SMALL_IMAGE_GRIDS
        for patch, img in grids:
            for distilled in (False, True):
                name = f"deit_{size}_{'distilled_' if distilled else ''}patch{patch}_{img}"
                variants[name] = ViTConfig(
                    img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, distilled=distilled
                )
    return variants


VARIANTS: dict[str, ViTConfig] = _variants()
# The paper's ImageNet weights as released with the official code; the hash prefix in each file name is
# checked on download (see deit.weights.fetch_weights). Used by create_model(name, pretrained=True).
OFFICIAL_WEIGHTS_BASE = "https://dl.fbaipublicfiles.com/deit/"
OFFICIAL_WEIGHTS = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small_patch16_224": "deit_small_patch16_224-cd65a155.pth",
    "deit_base_patch16_224": "deit_base_patch16_224-b5f2ef4d.pth",
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224-b40b3cf7.pth",
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224-649709d9.pth",
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224-df68dfff.pth",
    "deit_base_patch16_384": "deit_base_patch16_384-8de9b5d1.pth",
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384-d0272ac0.pth",
}
# timm model families whose position embeddings fix the input size at construction
_FIXED_SIZE_FAMILIES = ("vit", "deit", "cait", "beit", "eva", "swin", "xcit", "levit", "pit_", "tnt", "crossvit")


def list_models(pattern: str = "") -> list[str]:
    """Names of our own models (transformers and small-image CNNs) that contain ``pattern``."""
    return sorted(name for name in [*VARIANTS, *SMALL_RESNETS] if pattern in name)


def is_deit_model(name: str) -> bool:
    return name in VARIANTS


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    pretrained: bool | str = False,
    **overrides: Any,
) -> nn.Module:
    """Build a model by name.

    For our variants, ``overrides`` are fields of ``ViTConfig`` (``drop_path_rate``,
    ``attn_impl``, ``eval_output``, ...) and ``pretrained`` is a path or URL of a
    checkpoint file (official ``{'model': ...}``, timm state dict, or ours), or
    True for the official ImageNet weights of the paper's models (downloaded, hash-checked).
    Any other name goes to ``timm.create_model`` with the same arguments.
    """
    if name in SMALL_RESNETS:
        if pretrained is True:
            raise ModelError(f"{name} has no published weights: train it with `deit train --model {name}`")
        model = create_small_resnet(name, num_classes, in_chans, **overrides)
        if pretrained:
            load_weights(model, pretrained)
        return model
    if name.startswith("timm:") or name not in VARIANTS:
        return _create_timm_model(name.removeprefix("timm:"), num_classes, in_chans, img_size, pretrained, overrides)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; ViTConfig fields are {sorted(fields)}")
    config = dataclasses.replace(VARIANTS[name], num_classes=num_classes, in_chans=in_chans, **overrides)
    if img_size is not None:
        config = dataclasses.replace(config, img_size=img_size)
    model = VisionTransformer(config)
    if pretrained is True:
        if name not in OFFICIAL_WEIGHTS:
            raise ModelError(
                f"{name} has no published weights (those that do: {sorted(OFFICIAL_WEIGHTS)}); "
                "pass the path of a weights file as pretrained="
            )
        pretrained = OFFICIAL_WEIGHTS_BASE + OFFICIAL_WEIGHTS[name]
    if pretrained:
        load_weights(model, pretrained)
    return model


def load_weights(model: nn.Module, weights: str | dict[str, torch.Tensor], source: str | None = None) -> list[str]:
    """Load a weights file, URL or state dict into ``model``, adapting a DeiT's position embedding, channels, heads.

    Returns what had to be adapted (also logged, prefixed with ``source``).
    """
    from deit.weights import read_state_dict

    state = read_state_dict(weights) if isinstance(weights, str) else weights
    if not isinstance(model, VisionTransformer):
        model.load_state_dict(state)
        return []
    notes = load_adapted(model, state)
    for note in notes:
        log.info("%s: %s", source or weights, note)
    return notes


def _create_timm_model(
    name: str, num_classes: int, in_chans: int, img_size: int | None, pretrained: bool | str, overrides: dict[str, Any]
) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(VARIANTS) + timm.list_models(), n=5)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ModelError(f"unknown model {name!r}: neither a deit variant nor a timm model{hint}")
    kwargs = dict(overrides)
    if img_size is not None and any(family in name for family in _FIXED_SIZE_FAMILIES):
        kwargs.setdefault("img_size", img_size)  # CNNs take any size and do not accept img_size
    checkpoint_path = pretrained if isinstance(pretrained, str) else None
    model = timm.create_model(name, pretrained=pretrained is True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if checkpoint_path:
        from deit.weights import read_state_dict

        model.load_state_dict(read_state_dict(checkpoint_path))
    return model
