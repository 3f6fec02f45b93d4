"""One training epoch and one evaluation pass: models and loaders in, metric dicts out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from deit.losses import DistillationLoss
from deit.models import VisionTransformer, fuse_heads
from deit.optim import set_lr

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The autocast a run actually uses on its device."""

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, amp: str, device: torch.device) -> Precision:
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown precision {amp!r}; choose one of {sorted(AMP_DTYPES)}")
        return cls(device.type, AMP_DTYPES[amp])

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        if self.dtype is None:
            return f"fp32 on {self.device_type}"
        return f"{str(self.dtype).removeprefix('torch.')} autocast on {self.device_type}"


def train_one_epoch(
    model: nn.Module,
    criterion: DistillationLoss,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    lr_at: Callable[[int], float],
    first_step: int,
    device: torch.device,
    precision: Precision,
    teacher: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    progress: bool = False,
    description: str = "train",
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean losses, last lr and throughput."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps, images_seen, lr = 0, 0, float("nan")
    start = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        lr = lr_at(first_step + steps)
        set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            outputs = model(images)
            # the teacher sees exactly the batch the student saw, augmentations included
            teacher_logits = teacher(images) if criterion.needs_teacher else None
        losses = criterion.components(outputs, targets, teacher_logits)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {first_step + steps}; stopping")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        steps += 1
        images_seen += images.shape[0]
        if progress and steps % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = {name: (total / max(steps, 1)).item() for name, total in sums.items()}
    metrics.update(lr=lr, steps=steps, images_per_sec=images_seen / max(elapsed, 1e-9), seconds=elapsed)
    return metrics


def head_logits(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every prediction a model can make on ``images``, by name; ``prediction`` is what it returns in eval mode.

    A distilled DeiT gives each head and both fusions as well, so one pass
    reports them all.
    """
    if isinstance(model, VisionTransformer) and model.distilled:
        heads = model.forward_heads(images)
        cls_logits, dist_logits = heads["cls"], heads["dist"]
        return {
            "prediction": fuse_heads(cls_logits, dist_logits, model.eval_output),
            "cls": cls_logits,
            "dist": dist_logits,
            "avg_logits": fuse_heads(cls_logits, dist_logits, "avg_logits"),
            "softmax_sum": fuse_heads(cls_logits, dist_logits, "softmax_sum"),
        }
    return {"prediction": model(images)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    precision: Precision,
    progress: bool = False,
    description: str = "eval",
) -> dict[str, float]:
    """Top-1 / top-5 (in %) of every head, and the loss of the prediction.

    Keys: ``acc1``, ``acc5``, ``loss`` for the prediction; ``{head}_acc1`` and
    ``{head}_acc5`` for each head of a distilled model; ``num_samples``.
    """
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, targets in tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            predictions = head_logits(model, images)
        loss_sum += nn.functional.cross_entropy(predictions["prediction"].float(), targets, reduction="sum")
        for name, logits in predictions.items():
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices  # (B, k)
            hits = top.eq(targets[:, None])
            correct[f"{name}_acc1"] = correct.get(f"{name}_acc1", 0) + hits[:, 0].sum()
            correct[f"{name}_acc5"] = correct.get(f"{name}_acc5", 0) + hits.any(dim=-1).sum()
        count += images.shape[0]
    if count == 0:
        raise ValueError("the evaluation set is empty")
    metrics = {name.removeprefix("prediction_"): 100.0 * hits.item() / count for name, hits in correct.items()}
    metrics.update(loss=loss_sum.item() / count, num_samples=count)
    return metrics
