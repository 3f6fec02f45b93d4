"""One training epoch and one evaluation pass: models and loaders in, metric dicts out."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deit.config import ConfigError
from deit.ema import ModelEma
from deit.losses import DistillationLoss
from deit.models import VisionTransformer, fuse_heads
from deit.optim import set_lr
from deit.progress import StepProgress, on_terminal
from deit.rng import seed_step

log = logging.getLogger("deit")

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The autocast a run actually uses on its device."""

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, amp: str, device: torch.device) -> Precision:
        """``auto`` is bf16 where the device computes it natively, else fp32 (bf16 emulated is several times slower)."""
        if amp == "auto":
            amp = "bf16" if native_bf16(device) else "none"
        if amp not in AMP_DTYPES:
            raise ConfigError(f"unknown precision {amp!r}; choose one of {sorted(AMP_DTYPES)} or auto")
        if amp == "bf16" and not native_bf16(device):
            log.warning("bf16 on this %s is emulated, and slower than fp32: --amp auto picks fp32 here", device.type)
        return cls(device.type, AMP_DTYPES[amp])

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        if self.dtype is None:
            return f"fp32 on {self.device_type}"
        return f"{str(self.dtype).removeprefix('torch.')} autocast on {self.device_type}"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware: CUDA from Ampere on, CPUs with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; no step was taken with it."""


class StepGuard:
    """What the loop asks between steps; this one is for a single process with nothing to watch.

    ``agree`` runs before each backward pass: all processes must take it
    together, so a non-finite loss on any of them stops all of them (none waits
    forever in the gradient all-reduce). ``after_step`` runs after each optimizer
    step; it returns True to end the epoch there (a stop was requested).
    """

    def agree(self, loss: torch.Tensor, step: int) -> float:
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value} at step {step}; stopping without taking that step")
        return value

    def after_step(self, step: int, loss: float, lr: float) -> bool:
        return False


@dataclass
class EpochMeter:
    """Running sums of an epoch's losses. A mid-epoch checkpoint saves it, so a resumed epoch reports the same means."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0
    images: int = 0
    lr: float = float("nan")

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, torch.zeros((), device=value.device)) + value.detach().float()
        self.micro_batches += 1
        self.images += images

    def means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Mean of each loss over the epoch's micro-batches (of every process, with ``reduce`` summing across)."""
        names = sorted(self.sums)
        totals = torch.stack([self.sums[name].cpu() for name in names] + [torch.tensor(float(self.micro_batches))])
        if reduce is not None:
            totals = reduce(totals)
        return {name: (totals[i] / max(totals[-1].item(), 1)).item() for i, name in enumerate(names)}

    def state_dict(self) -> dict[str, Any]:
        sums = {name: value.cpu() for name, value in self.sums.items()}
        return {"sums": sums, "micro_batches": self.micro_batches, "images": self.images, "lr": self.lr}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochMeter:
        sums = {name: value.to(device) for name, value in state["sums"].items()}
        return cls(sums, int(state["micro_batches"]), int(state["images"]), float(state["lr"]))


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
    log_interval: int = 50,
    description: str = "train",
    steps: int | None = None,
    meter: EpochMeter | None = None,
    guard: StepGuard | None = None,
    seed: int | None = None,
    rank: int = 0,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train over ``loader`` for ``steps`` optimizer steps (default: all whole ones); returns this process's means.

    Steps are numbered globally: the first batch of ``loader`` belongs to step
    ``first_step``, and ``lr_at(step)`` gives its learning rate. Each step is
    ``accum_steps`` micro-batches. With ``seed``, each micro-batch reseeds the
    generators it draws from (Mixup, stochastic depth) from (seed, step,
    micro-batch, rank), which makes a run resumed at any step exact. ``meter``
    carries the epoch's sums in and out (a resumed epoch passes the saved one).
    The loader yields (images, labels, ..., indices); with ``batch_transform``,
    (uint8 images, labels, seeds, indices), and the transform augments the
    batch on the device (see ``data.batched``).
    """
    model.train()
    meter = meter if meter is not None else EpochMeter()
    guard = guard if guard is not None else StepGuard()
    if steps is None:
        steps = len(loader) // accum_steps  # type: ignore[arg-type]
    start = time.perf_counter()
    images_before = meter.images
    # a bar on a terminal; in a log file, a line every log_interval optimizer steps
    report = StepProgress(steps, description, enabled=progress, log_interval=log_interval)
    batches = iter(loader)
    step_loss = 0.0
    for offset in range(steps * accum_steps):
        step, micro = first_step + offset // accum_steps, offset % accum_steps
        images, targets, indices = _unpack(next(batches), device, batch_transform)
        if seed is not None:
            seed_step(seed, step, micro, rank)
        losses = _forward(model, criterion, images, targets, indices, teacher=teacher, mixup=mixup, precision=precision)
        step_loss += guard.agree(losses["loss"], step) / accum_steps
        last_micro = micro == accum_steps - 1
        with _maybe_no_sync(model, last_micro):  # DDP: all-reduce gradients once per optimizer step
            scaled = losses["loss"] / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        meter.add(losses, images.shape[0])
        if last_micro:
            meter.lr = lr_at(step)
            _optimizer_step(model, optimizer, meter.lr, scaler, clip_grad)
            if ema is not None:
                ema.update(_unwrap(model))
            report.update(images.shape[0] * accum_steps, loss=step_loss, lr=meter.lr)
            stop = guard.after_step(step, step_loss, meter.lr)
            step_loss = 0.0
            if stop:
                break
    report.close()
    elapsed = time.perf_counter() - start
    metrics = meter.means()
    rate = (meter.images - images_before) / max(elapsed, 1e-9)
    metrics.update(lr=meter.lr, steps=meter.micro_batches // accum_steps, images_per_sec=rate, seconds=elapsed)
    return metrics


def _unpack(
    batch: Sequence[torch.Tensor], device: torch.device, batch_transform: Callable | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images, labels and data-set indices of a loader batch, on the device and augmented.

    The loader yields (images, labels, ..., indices); with whole-batch
    augmentation, (uint8 images, labels, seeds, indices), finished here.
    """
    images, targets, *keys = (tensor.to(device, non_blocking=True) for tensor in batch)
    if batch_transform is not None:
        images = batch_transform(images, keys[0])
    return images, targets, keys[-1] if keys else None


def _forward(
    model: nn.Module,
    criterion: DistillationLoss,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor | None,
    *,
    teacher: nn.Module | None,
    mixup: Callable | None,
    precision: Precision,
) -> dict[str, torch.Tensor]:
    """The loss components of one micro-batch, after Mixup / CutMix."""
    if mixup is not None:
        images, targets = mixup(images, targets)  # targets become soft (B, classes)
    with precision.autocast():
        outputs = model(images)
        # the teacher sees exactly the batch the student saw, augmentations and mixing included
        teacher_logits = None
        if criterion.needs_teacher:
            indexed = getattr(teacher, "indexed", False)  # a cache or stored pseudo-labels: looked up by index
            teacher_logits = teacher(images, indices) if indexed else teacher(images)
    return criterion.components(outputs, targets, teacher_logits)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, under torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    model = getattr(model, "_orig_mod", model)
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


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
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (in %) of every head, and the loss of the prediction.

    Keys: ``acc1``, ``acc5``, ``loss`` for the prediction; ``{head}_acc1`` and
    ``{head}_acc5`` for each head of a distilled model; ``num_samples``. With
    several processes, each evaluates its own share of the images and
    ``reduce`` sums the counts across them.
    """
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device)
    count = 0
    bar = tqdm(loader, desc=description, disable=not (progress and on_terminal()), leave=False, dynamic_ncols=True)
    for images, targets in bar:  # no bar in a log file: an evaluation is short
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
    names = sorted(correct)
    totals = torch.stack([correct[name].double() for name in names] + [loss_sum.double()]).cpu()
    totals = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64)])
    if reduce is not None:
        totals = reduce(totals)
    count = int(totals[-1].item())
    if count == 0:
        raise ValueError("the evaluation set is empty")
    metrics = {name.removeprefix("prediction_"): 100.0 * totals[i].item() / count for i, name in enumerate(names)}
    metrics.update(loss=totals[-2].item() / count, num_samples=count)
    return metrics
