"""The training loop and the evaluation pass: ``train_steps`` yields one record per optimizer step.

``training.fit`` drives ``train_steps`` and decides, between records, what to
log, when to checkpoint and when to stop; this file knows nothing of files,
signals or configs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deit.config import ConfigError
from deit.data.batch import Batch
from deit.ema import ModelEma
from deit.losses import DistillationLoss
from deit.models import VisionTransformer, fuse_heads
from deit.optim import set_lr
from deit.progress import on_terminal
from deit.rng import seed_step
from deit.teachers import TeacherLike

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


@dataclass(frozen=True)
class StepParts:
    """What an optimizer step is made of; ``Run.step_parts`` builds it from the config."""

    model: nn.Module  # what the step calls: the model, or its DistributedDataParallel / compiled wrapper
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]  # the learning rate of a global step
    device: torch.device
    precision: Precision
    teacher: TeacherLike | None = None
    mixup: Callable | None = None  # Mixup / CutMix on (images, labels), making the labels soft
    augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # whole-batch: (uint8, seeds)
    accum_steps: int = 1
    clip_grad: float | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: ModelEma | None = None
    seed: int | None = None  # reseed Mixup and stochastic depth per micro-batch: exact resume at any step
    rank: int = 0
    # another objective than distillation (self-supervised pretraining): the losses of one micro-batch, and
    # what to do after each optimizer step (move a momentum target)
    losses: Callable[[StepParts, Batch], dict[str, torch.Tensor]] | None = None
    after_step: Callable[[int], None] | None = None


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as every process agreed on it."""

    step: int  # global, from 0
    loss: float  # mean over the step's micro-batches and every process
    lr: float
    images: int  # this process's images
    nonfinite: int = 0  # processes whose loss was NaN or infinite: then the step was not taken, and it is the last
    stop: bool = False  # some process was asked to stop


def train_steps(
    parts: StepParts,
    batches: Iterable[Batch],
    *,
    first_step: int,
    steps: int,
    meter: EpochMeter | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> Iterator[StepRecord]:
    """Take ``steps`` optimizer steps on ``batches``, yielding a record after each; the only training loop.

    Steps are numbered globally from ``first_step``, and ``parts.lr_at(step)``
    gives each one's learning rate, so a run resumed mid-epoch continues the
    schedule. A step is ``parts.accum_steps`` micro-batches. ``meter``
    collects the epoch's loss sums (a resumed epoch passes the saved one in).
    With several processes, ``reduce`` sums across them: once per step, on the
    device, the loss, the count of non-finite losses and the stop votes
    (``stop_requested``), so that every process makes the same decision. That
    is the step's only device-to-host copy. A non-finite loss anywhere ends the
    steps before the optimizer takes the step; its record says so, and the
    caller decides what to do.
    """
    parts.model.train()
    meter = meter if meter is not None else EpochMeter()
    batches = iter(batches)
    for step in range(first_step, first_step + steps):
        step_loss = torch.zeros((), device=parts.device)
        images = 0
        for micro in range(parts.accum_steps):
            batch = next(batches).to(parts.device)
            if parts.augment is not None:  # uint8 in-memory images: augmented here, a whole batch at once
                batch = batch._replace(images=parts.augment(batch.images, batch.seeds))
            if parts.seed is not None:
                seed_step(parts.seed, step, micro, parts.rank)
            losses = (parts.losses or micro_batch_losses)(parts, batch)
            with _maybe_no_sync(parts.model, micro == parts.accum_steps - 1):  # DDP: one gradient all-reduce a step
                scaled = losses["loss"] / parts.accum_steps
                (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
            meter.add(losses, len(batch.labels))  # images, not views: pretraining sees two of each
            step_loss += losses["loss"].detach().float() / parts.accum_steps
            images += len(batch.labels)
        loss, nonfinite, stop = _agree(step_loss, stop_requested, reduce)
        lr = parts.lr_at(step)
        if nonfinite:
            parts.optimizer.zero_grad(set_to_none=True)
            yield StepRecord(step, loss, lr, images, nonfinite, stop)
            return
        meter.lr = lr
        _optimizer_step(parts.model, parts.optimizer, lr, parts.scaler, parts.clip_grad)
        if parts.ema is not None:
            parts.ema.update(_unwrap(parts.model))
        if parts.after_step is not None:
            parts.after_step(step)
        yield StepRecord(step, loss, lr, images, nonfinite, stop)


def micro_batch_losses(parts: StepParts, batch: Batch) -> dict[str, torch.Tensor]:
    """The loss and its components on one micro-batch, after Mixup / CutMix."""
    images, labels = batch.images, batch.labels
    if parts.mixup is not None:
        images, labels = parts.mixup(images, labels)  # the labels become soft (B, classes)
    with parts.precision.autocast():
        outputs = parts.model(images)
        teacher_logits = None
        if parts.criterion.needs_teacher:
            # the teacher sees exactly the batch the student saw, augmentations and mixing included
            teacher_logits = parts.teacher(images, batch.indices)
    return parts.criterion.components(outputs, labels, teacher_logits)


def _agree(
    step_loss: torch.Tensor,
    stop_requested: Callable[[], bool] | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[float, int, bool]:
    """The step's loss (mean over processes), how many processes had a non-finite one, and whether any must stop."""
    stop = float(stop_requested()) if stop_requested is not None else 0.0
    flags = torch.tensor([stop, 1.0], device=step_loss.device)  # the stop vote, and a 1 that counts the processes
    votes = torch.cat([torch.stack([step_loss, (~step_loss.isfinite()).float()]), flags])
    if reduce is not None:
        votes = reduce(votes)
    total, nonfinite, stops, processes = votes.tolist()  # the step's one device-to-host copy
    return total / processes, int(nonfinite), stops > 0


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
