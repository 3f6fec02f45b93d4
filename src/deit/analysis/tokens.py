"""How alike the class and distillation tokens are, layer by layer, and how alike their heads are.

The paper reports a cosine of 0.06 between the two learned tokens at the
input and 0.93 at the output: they start apart and converge, without
becoming the same (a cosine of 1 would make the second token useless).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deit.models import VisionTransformer


def _require_distilled(model: VisionTransformer) -> None:
    if not (isinstance(model, VisionTransformer) and model.distilled):
        raise ValueError("token analysis needs a distilled DeiT (a deit_*_distilled_* model with two tokens)")


@torch.no_grad()
def token_cosines(model: VisionTransformer, images: torch.Tensor) -> list[float]:
    """Mean cosine between the class and distillation tokens: [learned parameters, input, block 1..L, final norm].

    "learned parameters" compares the two token embeddings themselves; "input"
    adds their position embeddings; each later entry is after one block, and
    the last after the final LayerNorm, which is what the two heads read.
    """
    _require_distilled(model)
    model.eval()
    cosines = [F.cosine_similarity(model.cls_token.flatten(), model.dist_token.flatten(), dim=0).item()]
    x = model.patch_embed(images)
    x = torch.cat([model.prefix_tokens(x.shape[0]), x], dim=1) + model.pos_embed  # (B, 2 + N, C)
    cosines.append(F.cosine_similarity(x[:, 0], x[:, 1], dim=-1).mean().item())
    for block in model.blocks:
        x = block(x)
        cosines.append(F.cosine_similarity(x[:, 0], x[:, 1], dim=-1).mean().item())
    x = model.norm(x)
    cosines.append(F.cosine_similarity(x[:, 0], x[:, 1], dim=-1).mean().item())
    return cosines


def token_cosine_labels(depth: int) -> list[str]:
    return ["tokens", "input", *(f"block {i + 1}" for i in range(depth)), "output"]


@torch.no_grad()
def head_cosine(model: VisionTransformer) -> float:
    """Mean cosine between the class head's and the distillation head's weight row of each class."""
    _require_distilled(model)
    return F.cosine_similarity(model.head.weight, model.head_dist.weight, dim=-1).mean().item()
