"""Where the class and distillation tokens look: last-layer attention and attention rollout.

Rollout (Abnar & Zuidema, 2020) follows attention through every layer: each
layer's head-averaged attention is mixed half and half with the identity (the
residual connection), rows renormalised, and the layers multiplied from the
first to the last. A token's row over the patch tokens, reshaped to the patch
grid, is its map.
"""

from __future__ import annotations

import torch

from deit.models import VisionTransformer


@torch.no_grad()
def attention_per_layer(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Head-averaged attention of every block, each (B, T, T) with T = prefix tokens + patches."""
    model.eval()
    x = model.patch_embed(images)
    x = torch.cat([model.prefix_tokens(x.shape[0]), x], dim=1) + model.pos_embed
    maps = []
    for block in model.blocks:
        maps.append(block.attn.attention_weights(block.norm1(x)).mean(dim=1))  # (B, T, T)
        x = block(x)
    return maps


def rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout through ``layers`` (each (B, T, T)); rows sum to 1."""
    identity = torch.eye(layers[0].shape[-1], device=layers[0].device)
    result = identity.expand_as(layers[0])
    for attention in layers:
        mixed = 0.5 * attention + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed @ result
    return result


def token_maps(model: VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps over the patch grid, (B, grid, grid), of the class token and (if any) the distillation token.

    Keys: ``cls_last`` / ``dist_last`` (the last block's attention from the
    token to each patch) and ``cls_rollout`` / ``dist_rollout``.
    """
    layers = attention_per_layer(model, images)
    rolled = rollout(layers)
    grid, prefix = model.patch_embed.grid_size, model.num_prefix_tokens
    tokens = {"cls": 0, "dist": 1} if model.distilled else {"cls": 0}
    maps = {}
    for name, row in tokens.items():
        for kind, source in (("last", layers[-1]), ("rollout", rolled)):
            patches = source[:, row, prefix:]  # (B, grid * grid)
            patches = patches / patches.sum(dim=-1, keepdim=True)  # a distribution over the patches
            maps[f"{name}_{kind}"] = patches.reshape(-1, grid, grid)
    return maps
