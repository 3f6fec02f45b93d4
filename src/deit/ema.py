"""Exponential moving average of a model's weights (the paper's EMA, decay 0.99996 per step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of a model whose weights trail the live ones: ema = decay * ema + (1 - decay) * live.

    Buffers (batch-norm statistics) are copied as they are. The copy lives on
    the live model's device and is evaluated and checkpointed beside it.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = live[name].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value, 1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
