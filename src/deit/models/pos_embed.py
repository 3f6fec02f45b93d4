"""Changing resolution and class count: adapt a state dict to the model it is loaded into.

At a new input size the patch grid changes while the class and distillation
tokens do not: their position embeddings are kept bit for bit and the grid
part is resampled bicubically (the paper's fine-tuning at 384 px). A new class
count drops the heads, which the model then keeps at their fresh
initialisation. A first convolution trained on 3 channels is summed to 1 for
grayscale data, and repeated (and rescaled) for more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import ModelError

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """(1, prefix + old_grid², C) -> (1, prefix + new_grid², C); the prefix rows are copied unchanged."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, C, H, W)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A (out, c, k, k) patch projection for ``in_chans`` channels, keeping the response to gray images."""
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / have)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (have / in_chans)


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` reshaped for ``model`` (a VisionTransformer), and what was changed, for the log."""
    target = model.state_dict()
    state = dict(state)
    notes = []
    if ("dist_token" in state) != ("dist_token" in target):
        have = "has" if "dist_token" in state else "has no"
        raise ModelError(
            f"the weights {have} a distillation token and the model {'has' if 'dist_token' in target else 'has not'}; "
            "fine-tune a distilled checkpoint into a distilled model (deit_*_distilled_*) and vice versa"
        )
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        new_grid = model.patch_embed.grid_size
        old_rows = state["pos_embed"].shape[1] - model.num_prefix_tokens
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, model.num_prefix_tokens)
        notes.append(
            f"position embedding resampled from a {math.isqrt(old_rows)}² to a {new_grid}² patch grid (bicubic)"
        )
    proj = "patch_embed.proj.weight"
    if proj in state and state[proj].shape[1] != target[proj].shape[1]:
        notes.append(f"patch projection adapted from {state[proj].shape[1]} to {target[proj].shape[1]} input channels")
        state[proj] = adapt_input_conv(state[proj], target[proj].shape[1])
    if "head.weight" in state and state["head.weight"].shape != target["head.weight"].shape:
        old, new = state["head.weight"].shape[0], target["head.weight"].shape[0]
        for key in HEAD_KEYS:
            state.pop(key, None)
        notes.append(f"heads re-initialised: the weights predict {old} classes, the data set has {new}")
    return state, notes


def load_adapted(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model`` after ``adapt_state_dict``; every other key must match exactly."""
    state, notes = adapt_state_dict(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in HEAD_KEYS or any(k in state for k in HEAD_KEYS)]
    if missing or unexpected:
        raise ModelError(f"the weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return notes
