"""Using what a run learned: its backbone as a frozen feature extractor, or as the start of a new model.

A ``deit pretrain`` checkpoint holds the whole method (backbone, projection
heads, targets, queue) under ``backbone.model.*``, ``projector.*`` and so on;
a ``deit train`` checkpoint holds a classifier. Both give the same thing here:
the backbone's weights, named as in the model itself, without any head.

``deit train --init FILE`` starts a student or a teacher from them
(``init_from_pretrained``). Its heads always start fresh, since the
pretrained network had none, or had them for another task. A DeiT student with a
distillation token, started from a backbone without one, keeps its fresh token
and that token's row of the position embedding. A new input size or channel count
is adapted as in fine-tuning (``models.pos_embed``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from torch import nn

from deit.checkpoint import Checkpoint, ModelSpec
from deit.errors import ModelError
from deit.models import VisionTransformer
from deit.models.pos_embed import adapt_state_dict
from deit.ssl.backbone import Backbone, classifier_heads, pooling_for
from deit.ssl.cmc import SECOND_VIEW_CHANNELS, TwoEncoders, ViewSplit

log = logging.getLogger("deit")

_METHOD_PREFIX = "backbone.model."  # where a pretraining run's Method keeps the network it pretrains
_SECOND_PREFIX = "second.model."  # CMC's encoder of the second view


def pretraining_method(checkpoint: Checkpoint) -> str | None:
    """``simclr``, ``moco``, ... for a ``deit pretrain`` checkpoint; None for a classifier."""
    return checkpoint.config.get("pretrain", {}).get("method")


def describe(checkpoint: Checkpoint) -> str:
    method = pretraining_method(checkpoint)
    trained = f"pretrained with {method}" if method else "trained with labels"
    return f"{checkpoint.model_spec.name} {trained} on {checkpoint.data.dataset}, {checkpoint.epoch} epoch(s)"


def backbone_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The network's weights named as in the model itself; a pretraining run's heads and targets are left out."""
    if pretraining_method(checkpoint) is None:
        return dict(checkpoint.model)
    weights = checkpoint.model.items()
    return {key.removeprefix(_METHOD_PREFIX): value for key, value in weights if key.startswith(_METHOD_PREFIX)}


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s classification heads: what a pretrained backbone never provides."""
    owned = {id(tensor) for head in classifier_heads(model) for tensor in head.state_dict(keep_vars=True).values()}
    return {key for key, tensor in model.state_dict(keep_vars=True).items() if id(tensor) in owned}


def load_backbone(path: str | os.PathLike, *, random_init: bool = False) -> tuple[nn.Module, Checkpoint]:
    """The representation in a ``deit pretrain`` or ``deit train`` checkpoint, as a feature extractor.

    That is the backbone, or for CMC its two encoders with their features
    concatenated. With ``random_init``, the same architecture at its
    initialisation: the linear probe's first baseline.
    """
    checkpoint = Checkpoint.load(path)
    weights = None if random_init else backbone_weights(checkpoint)
    method = pretraining_method(checkpoint)
    backbone = Backbone(_network(checkpoint.model_spec, weights, path), pool=pooling_for(method))
    if method != "cmc":
        return backbone, checkpoint
    spec = dataclasses.replace(checkpoint.model_spec, in_chans=SECOND_VIEW_CHANNELS)
    if weights is not None:
        weights = {key.removeprefix(_SECOND_PREFIX): value for key, value in checkpoint.model.items()
                   if key.startswith(_SECOND_PREFIX)}  # fmt: skip
    second = Backbone(_network(spec, weights, path))
    return TwoEncoders(backbone, second, ViewSplit(checkpoint.data.mean, checkpoint.data.std)), checkpoint


def _network(spec: ModelSpec, weights: dict[str, torch.Tensor] | None, path: str | os.PathLike) -> nn.Module:
    """``spec``'s network with ``weights`` (every weight but the heads), or at its initialisation without."""
    model = spec.build()
    if weights is None:
        return model
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = sorted(set(missing) - head_keys(model))
    if missing or unexpected:
        raise ModelError(
            f"{path} does not hold a whole {spec.name}: missing {missing[:6]}, unexpected {list(unexpected)[:6]}"
        )
    return model


def init_from_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Start ``model`` from the backbone in ``path``: every network weight loaded, heads fresh. Returns the log."""
    checkpoint = Checkpoint.load(path)
    heads = head_keys(model)
    weights = {key: value for key, value in backbone_weights(checkpoint).items() if key not in heads}
    notes = []
    if isinstance(model, VisionTransformer):
        weights, token_notes = _match_distillation_token(weights, model)
        weights, adapted = adapt_state_dict(weights, model)
        notes += token_notes + adapted
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = sorted(set(missing) - heads)
    if missing or unexpected:
        raise ModelError(
            f"--init {path}: its {checkpoint.model_spec.name} does not fit this model: missing {missing[:6]}, "
            f"unexpected {list(unexpected)[:6]}. Start a model of the same architecture (a distillation token and "
            "the input size may differ)"
        )
    notes.insert(0, f"loaded {len(weights)} tensors from {path} ({describe(checkpoint)}); fresh: {sorted(heads)}")
    for note in notes:
        log.info("--init: %s", note)
    return notes


def _match_distillation_token(
    weights: dict[str, torch.Tensor], model: VisionTransformer
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Give or take the distillation token (and its position row, the second) so the token count matches."""
    has_token = "dist_token" in weights
    if has_token == model.distilled or "pos_embed" not in weights:
        return weights, []
    weights, pos = dict(weights), weights["pos_embed"]
    if model.distilled:  # a backbone without the token: the student keeps its own fresh token and row
        weights["dist_token"] = model.dist_token.detach().clone()
        weights["pos_embed"] = torch.cat([pos[:, :1], model.pos_embed.detach()[:, 1:2], pos[:, 1:]], dim=1)
        return weights, ["the backbone has no distillation token: the student's starts fresh, with its position row"]
    del weights["dist_token"]
    weights["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return weights, ["the backbone's distillation token (and its position row) left out: this model has none"]
