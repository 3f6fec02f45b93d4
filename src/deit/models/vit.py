"""The vision transformer, with or without DeiT's distillation token.

A distilled model carries two learned tokens in front of the patch tokens: the
class token, read by ``head`` and trained on the labels, and the distillation
token, read by ``head_dist`` and trained on the teacher. While training it
returns both logits; in eval mode it returns one prediction, chosen by
``eval_output``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deit.models.layers import Block, PatchEmbed

# What a distilled model returns in eval mode:
#   avg_logits   mean of the two heads' logits (the official code)
#   softmax_sum  log of the mean of the two softmaxes: the paper's sum of softmaxes, as log-probabilities
#   cls, dist    one head alone
EVAL_OUTPUTS = ("avg_logits", "softmax_sum", "cls", "dist")


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False  # add the distillation token and head_dist
    drop_rate: float = 0.0  # dropout after attention / MLP projections (the paper uses none)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth at the last block, linear from 0 at the first
    norm_eps: float = 1e-6
    attn_impl: str = "sdpa"  # "sdpa" or "math", see layers.Attention
    eval_output: str = "avg_logits"  # one of EVAL_OUTPUTS, for distilled models


def fuse_heads(cls_logits: torch.Tensor, dist_logits: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the class and distillation heads into one prediction, (B, classes)."""
    if how == "avg_logits":
        return (cls_logits + dist_logits) / 2
    if how == "softmax_sum":
        probs = (cls_logits.float().softmax(-1) + dist_logits.float().softmax(-1)) / 2
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    if how == "cls":
        return cls_logits
    if how == "dist":
        return dist_logits
    raise ValueError(f"unknown head fusion {how!r}; choose one of {EVAL_OUTPUTS}")


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_prefix_tokens = 2 if config.distilled else 1
        self.eval_output = config.eval_output
        dim = config.embed_dim

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim,
                    config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop=config.drop_rate,
                    attn_drop=config.attn_drop_rate,
                    drop_path=rate,
                    norm_eps=config.norm_eps,
                    attn_impl=config.attn_impl,
                )
                for rate in drop_path_rates
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        self.head_dist = nn.Linear(dim, config.num_classes) if config.distilled else None
        self._init_weights()

    @property
    def eval_output(self) -> str:
        return self._eval_output

    @eval_output.setter
    def eval_output(self, how: str) -> None:
        if how not in EVAL_OUTPUTS:
            raise ValueError(f"unknown eval output {how!r}; choose one of {EVAL_OUTPUTS}")
        self._eval_output = how

    @property
    def distilled(self) -> bool:
        return self.dist_token is not None

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer must not decay, besides biases and norm weights."""
        return {"pos_embed", "cls_token", "dist_token"}

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        tokens = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        return torch.cat(tokens, dim=1).expand(batch, -1, -1)  # (B, 1 or 2, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, prefix + patches, C)."""
        x = self.patch_embed(x)  # (B, N, C)
        x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head: ``{"cls": ...}`` and, for a distilled model, ``"dist"``."""
        tokens = self.forward_features(x)
        heads = {"cls": self.head(tokens[:, 0])}
        if self.head_dist is not None:
            heads["dist"] = self.head_dist(tokens[:, 1])
        return heads

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        heads = self.forward_heads(x)
        if "dist" not in heads:
            return heads["cls"]
        if self.training:
            return heads["cls"], heads["dist"]
        return fuse_heads(heads["cls"], heads["dist"], self.eval_output)
