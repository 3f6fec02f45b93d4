"""AdamW with the paper's parameter groups, and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deit.config import OptimConfig

REFERENCE_BATCH = 512  # the paper's lr is given for this global batch and scaled linearly


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest (biases, norms, position embedding, tokens).

    A model may name parameters that stay at the peak learning rate whatever the schedule
    (``unscheduled_parameters``: DeepCluster's head, which starts afresh every epoch); they
    form a third group, decayed, that ``set_lr`` leaves alone.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    unscheduled = set(model.unscheduled_parameters()) if hasattr(model, "unscheduled_parameters") else set()
    decay, no_decay, constant = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in unscheduled:
            constant.append(param)
        elif param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if constant:
        groups.append({"params": constant, "weight_decay": weight_decay, "scheduled": False})
    return groups


def peak_lr(config: OptimConfig, global_batch: int) -> float:
    return config.lr * global_batch / REFERENCE_BATCH if config.scale_lr else config.lr


def build_optimizer(model: nn.Module, config: OptimConfig, global_batch: int) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=peak_lr(config, global_batch), betas=config.betas, eps=config.eps
    )


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ``warmup_lr`` to ``peak_lr``, then cosine down to ``min_lr``, per iteration.

    A pure function of the step, so resuming needs only the step number.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    @classmethod
    def from_config(cls, config: OptimConfig, global_batch: int, steps_per_epoch: int) -> WarmupCosine:
        total = config.epochs * steps_per_epoch
        warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total)
        return cls(peak_lr(config, global_batch), total, warmup, config.warmup_lr, config.min_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if group.get("scheduled", True):  # an unscheduled group keeps the peak lr it was built with
            group["lr"] = lr
