"""One training epoch and one evaluation pass: models and loaders in, metric dicts out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from deit.ema import ModelEma
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
    mixup: Callable | None = None,
    accum_steps: int = 1,
    ema: ModelEma | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    progress: bool = False,
    description: str = "train",
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean losses, last lr and throughput.

    ``first_step`` and ``lr_at`` count optimizer steps, each made of
    ``accum_steps`` micro-batches (a trailing incomplete group is dropped).
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    micro_batches, images_seen, lr = 0, 0, float("nan")
    start = time.perf_counter()
    usable = len(loader) // accum_steps * accum_steps if hasattr(loader, "__len__") else None
    bar = tqdm(loader, desc=description, total=usable, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        if micro_batches == usable:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)  # targets become soft (B, classes)
        with precision.autocast():
            outputs = model(images)
            # the teacher sees exactly the batch the student saw, augmentations and mixing included
            teacher_logits = teacher(images) if criterion.needs_teacher else None
        losses = criterion.components(outputs, targets, teacher_logits)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            step = first_step + micro_batches // accum_steps
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}; stopping")
        scaled = loss / accum_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        micro_batches += 1
        if micro_batches % accum_steps == 0:
            lr = lr_at(first_step + micro_batches // accum_steps - 1)
            _optimizer_step(model, optimizer, lr, scaler, clip_grad)
            if ema is not None:
                ema.update(model)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        images_seen += images.shape[0]
        if progress and micro_batches % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = {name: (total / max(micro_batches, 1)).item() for name, total in sums.items()}
    metrics.update(
        lr=lr, steps=micro_batches // accum_steps, images_per_sec=images_seen / max(elapsed, 1e-9), seconds=elapsed
    )
    return metrics


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float | None,
) -> None:
    set_lr(optimizer, lr)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
