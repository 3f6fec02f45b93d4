"""The network being pretrained, seen as a feature extractor, and the small MLPs the methods put on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deit.models import VisionTransformer, create_model
from deit.models.cnn import SmallResNet


def pooling_for(method: str | None) -> str:
    """How a ViT pretrained by ``method`` is read: BEiT's loss trains the patch tokens, never the class token, so
    its features are the patch tokens' mean, as BEiT's own linear probe takes them; every other method's, the
    class token."""
    return "mean" if method == "beit" else "class"


class Backbone(nn.Module):
    """Features of one image, (B, dim): our ViT's class token (or with ``pool="mean"`` its patch tokens' mean),
    a small ResNet's or a timm CNN's pooled map."""

    def __init__(self, model: nn.Module, *, pool: str = "class") -> None:
        super().__init__()
        if pool not in ("class", "mean"):
            raise ValueError(f"pool {pool!r}: choose 'class' or 'mean'")
        self.pool = pool
        if isinstance(model, VisionTransformer | SmallResNet):
            # the heads stay in the state dict (checkpoints keep the model's layout) but take no part: frozen, so
            # that DistributedDataParallel does not wait for their gradients
            for head in classifier_heads(model):
                head.requires_grad_(False)
        else:
            model.reset_classifier(0)  # timm: the model now returns its pooled features
        self.model = model
        if isinstance(model, VisionTransformer):
            self.dim = model.config.embed_dim
        elif isinstance(model, SmallResNet):
            self.dim = model.config.widths[-1]
        else:
            self.dim = model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, VisionTransformer):
            tokens = self.model.forward_features(images)
            return tokens[:, self.model.num_prefix_tokens :].mean(dim=1) if self.pool == "mean" else tokens[:, 0]
        if isinstance(self.model, SmallResNet):
            return self.model.forward_features(images)
        return self.model(images)


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The layers that turn ``model``'s features into class logits: what pretraining never trains."""
    if isinstance(model, VisionTransformer):
        return [head for head in (model.head, model.head_dist) if head is not None]
    if isinstance(model, SmallResNet):
        return [model.fc]
    return [model.get_classifier()]  # timm


def build_backbone(name: str, *, in_chans: int, img_size: int, **options: Any) -> Backbone:
    """``name`` (a deit variant, a small ResNet or any timm model) as a feature extractor; its head is unused."""
    return Backbone(create_model(name, num_classes=1, in_chans=in_chans, img_size=img_size, **options))


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, *, last_norm: bool = False, batch_norm: bool = True
) -> nn.Sequential:
    """``layers`` linear layers with batch norm (unless not ``batch_norm``) and ReLU between them: the heads."""
    blocks: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    for index, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        last = index == layers - 1
        blocks.append(nn.Linear(a, b, bias=(last and not last_norm) or not batch_norm))
        if not last:
            blocks += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
        elif last_norm:
            blocks.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*blocks)
