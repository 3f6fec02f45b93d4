"""What MoCo and BYOL keep besides the weights they train: a momentum target and MoCo's queue of keys."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: the target's momentum rises from ``base`` to 1 along a half cosine over the run."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """The target network: a copy that follows ``module`` by momentum, never by gradients."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def follow(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = momentum x target + (1 - momentum) x online, for every parameter; buffers are copied."""
    for mine, theirs in zip(target.parameters(), online.parameters(), strict=True):
        mine.lerp_(theirs.detach(), 1 - momentum)
    for mine, theirs in zip(target.buffers(), online.buffers(), strict=True):
        mine.copy_(theirs)


class KeyQueue(nn.Module):
    """MoCo v2's first-in, first-out queue of the K most recent keys; a buffer, so checkpoints carry it."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` entries with ``keys``, wrapping around the end."""
        size = len(self.keys)
        if len(keys) > size:
            keys = keys[-size:]
        slots = (self.position + torch.arange(len(keys), device=self.keys.device)) % size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.position.copy_((self.position + len(keys)) % size)
