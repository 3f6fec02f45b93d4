"""A whole training run from a config: build, train, evaluate, log, checkpoint.

``fit(config)`` is what ``deit train`` calls; ``evaluate_checkpoint`` is
``deit eval``. Output directory layout:

    config.yaml       the resolved config
    metrics.jsonl     one JSON record per epoch (train losses, every head's accuracy)
    checkpoint.pth    the latest epoch (model, optimizer, RNG states), written atomically
    best.pth          the epoch with the best validation top-1
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    weights_of,
)
from deit.config import ModelConfig, TrainConfig, config_to_dict, save_config
from deit.data import DataBundle, DatasetInfo, build_data
from deit.data.augment import build_mixup
from deit.ema import ModelEma
from deit.engine import Precision, evaluate, train_one_epoch
from deit.losses import DistillationLoss
from deit.models import VisionTransformer, create_model, is_deit_model, load_weights
from deit.optim import WarmupCosine, build_optimizer
from deit.rng import restore_rng_state, rng_state, seed_everything
from deit.teachers import InputSpec, Teacher, build_teacher

log = logging.getLogger("deit")


class RunError(RuntimeError):
    """A run that cannot start or continue as configured; the message says why."""


@dataclass
class TrainResult:
    output_dir: Path | None
    final: dict[str, float]  # validation metrics after the last epoch
    best_acc1: float
    teacher: dict[str, float] | None  # the teacher's validation metrics, when there is one
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name} asked for, but CUDA is not available on this machine")
    return device


def model_options(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``create_model`` from the model section."""
    options: dict[str, Any] = {"drop_path_rate": config.drop_path, "drop_rate": config.dropout}
    if is_deit_model(config.name):
        options.update(attn_impl=config.attn_impl, eval_output=config.eval_output)
    return options


def model_spec(config: ModelConfig, info: DatasetInfo, input_size: int) -> dict[str, Any]:
    """Everything needed to rebuild the model from a checkpoint (see checkpoint.model_from_checkpoint)."""
    return {
        "name": config.name,
        "num_classes": info.num_classes,
        "in_chans": info.in_chans,
        "img_size": input_size,  # used by transformers (ours and timm's); CNNs take any size
        "options": model_options(config),
    }


def _prepare_output_dir(config: TrainConfig) -> Path | None:
    if config.run.output_dir is None:
        return None
    out = Path(config.run.output_dir)
    if (out / "checkpoint.pth").exists() and config.run.resume is None:
        raise RunError(
            f"{out} already holds a run (checkpoint.pth): add --resume auto to continue it, "
            "or choose another --output-dir; nothing was overwritten"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resume_path(config: TrainConfig, out: Path | None) -> Path | str | None:
    if config.run.resume is None:
        return None
    if config.run.resume == "auto":
        if out is None:
            raise RunError("--resume auto needs --output-dir")
        latest = out / "checkpoint.pth"
        return latest if latest.exists() else None  # nothing yet: start from scratch
    return config.run.resume  # a path or a URL: load_checkpoint reads both


def _build_teacher(config: TrainConfig, data: DataBundle) -> Teacher | None:
    distill = config.distill
    if distill.type == "none" and not (distill.teacher_path or distill.teacher_pretrained):
        return None
    return build_teacher(
        distill.teacher_model,
        distill.teacher_path,
        student_input=InputSpec(data.info.in_chans, data.info.mean, data.info.std),
        num_classes=data.info.num_classes,
        class_names=data.info.class_names,
        input_size=data.input_size,
        pretrained=distill.teacher_pretrained,
    )


def _explain_heads(model: nn.Module, distillation_type: str) -> None:
    distilled = isinstance(model, VisionTransformer) and model.distilled
    if distilled and distillation_type == "none":
        log.warning(
            "distilled model without a teacher: both the class and the distillation head learn from the labels, "
            "so the fused prediction never includes an untrained head"
        )
    elif not distilled and distillation_type != "none":
        log.info("the model has no distillation token: label and teacher terms both train its single head")


@dataclass
class Run:
    """Everything a training run is made of, built once from its config."""

    config: TrainConfig
    device: torch.device
    precision: Precision
    data: DataBundle
    spec: dict[str, Any]
    model: nn.Module
    teacher: Teacher | None
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler | None
    mixup: Callable | None
    ema: ModelEma | None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return len(self.data.train_loader) // self.config.optim.accum_steps

    def checkpoint_state(self, epoch: int, best_acc1: float, history: list[dict[str, Any]]) -> dict[str, Any]:
        info = self.data.info
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "model_spec": self.spec,
            "data": {
                "dataset": info.name,
                "class_names": list(info.class_names),
                "mean": list(info.mean),
                "std": list(info.std),
                "input_size": self.data.input_size,
            },
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "best_acc1": best_acc1,
            "history": history,
            "config": config_to_dict(self.config),
            "rng": rng_state(self.data.train_loader.generator),
        }


def _build_student(spec: dict[str, Any], finetune: str | None) -> nn.Module:
    model = create_model(
        spec["name"],
        num_classes=spec["num_classes"],
        in_chans=spec["in_chans"],
        img_size=spec["img_size"],
        **spec["options"],
    )
    if finetune:
        load_weights(model, finetune)  # logs what it had to adapt (resolution, channels, heads)
    return model


def _build_mixup(config: TrainConfig, num_classes: int) -> Callable | None:
    augment = config.augment
    mixup = build_mixup(
        mixup=augment.mixup,
        cutmix=augment.cutmix,
        prob=augment.mix_prob,
        switch_prob=augment.mix_switch_prob,
        label_smoothing=config.optim.label_smoothing,
        num_classes=num_classes,
    )
    if mixup is not None and config.optim.batch_size % 2:
        raise RunError(
            f"Mixup / CutMix pair the images of a batch: use an even --batch-size, not {config.optim.batch_size}"
        )
    return mixup


def build_run(config: TrainConfig) -> Run:
    """Data, model, teacher, loss and optimizer for ``config``; the teacher is checked here, before any step."""
    device = resolve_device(config.run.device)
    precision = Precision.resolve(config.run.amp, device)
    seed_everything(config.run.seed)
    data = build_data(
        config.data.dataset,
        config.data.path,
        batch_size=config.optim.batch_size,
        seed=config.run.seed,
        input_size=config.data.input_size,
        download=config.data.download,
        in_chans=config.data.in_chans,
        train_subset=config.data.train_subset,
        num_workers=config.data.num_workers,
        hflip=config.augment.hflip,
        rand_augment=config.augment.rand_augment,
        random_erasing=config.augment.random_erasing,
        repeated_aug=config.augment.repeated_aug,
        pin_memory=device.type == "cuda",
    )
    spec = model_spec(config.model, data.info, data.input_size)
    model = _build_student(spec, config.model.finetune).to(device)
    teacher = _build_teacher(config, data)
    criterion = DistillationLoss(
        config.distill.type,
        alpha=config.distill.alpha,
        tau=config.distill.tau,
        kl_reduction=config.distill.kl_reduction,
        label_smoothing=config.optim.label_smoothing,
    )
    _explain_heads(model, config.distill.type)
    global_batch = config.optim.batch_size * config.optim.accum_steps
    optimizer_steps_per_epoch = len(data.train_loader) // config.optim.accum_steps
    if optimizer_steps_per_epoch == 0:
        raise RunError(
            f"{len(data.train_loader)} batches per epoch are fewer than --accum-steps {config.optim.accum_steps}"
        )
    return Run(
        config=config,
        device=device,
        precision=precision,
        data=data,
        spec=spec,
        model=model,
        teacher=teacher.to(device) if teacher is not None else None,
        criterion=criterion,
        optimizer=build_optimizer(model, config.optim, global_batch),
        schedule=WarmupCosine.from_config(config.optim, global_batch, optimizer_steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if precision.dtype == torch.float16 else None,
        mixup=_build_mixup(config, data.info.num_classes),
        ema=ModelEma(model, config.optim.ema_decay) if config.optim.ema_decay else None,
    )


def fit(config: TrainConfig) -> TrainResult:
    """Train a model as ``config`` says and return its metrics (and the trained model)."""
    started = time.perf_counter()
    out = _prepare_output_dir(config)
    run = build_run(config)
    log.info(
        "model %s (%.2fM parameters), %s, %d training / %d validation images at %d px, %s, lr %.2e",
        config.model.name,
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        run.data.info.name,
        len(run.data.train_loader.dataset),
        len(run.data.val_loader.dataset),
        run.data.input_size,
        run.precision.describe(),
        run.schedule.peak_lr,
    )
    start_epoch, best_acc1, history = 0, 0.0, []
    resume_from = _resume_path(config, out)
    if resume_from is not None:
        start_epoch, best_acc1, history = _resume(run, resume_from)
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)
    if out is not None:
        save_config(config, out / "config.yaml")

    teacher_metrics = None
    if run.teacher is not None and config.run.eval_teacher:
        teacher_metrics = evaluate(
            run.teacher, run.data.val_loader, device=run.device, precision=run.precision, description="teacher"
        )
        log.info("teacher %s: top-1 %.2f%% on the validation set", run.teacher.name, teacher_metrics["acc1"])

    for epoch in range(start_epoch, config.optim.epochs):
        record = _train_and_evaluate_epoch(run, epoch)
        if teacher_metrics is not None:
            record["teacher"] = teacher_metrics
        history.append(record)
        improved = record["val"]["acc1"] > best_acc1
        best_acc1 = max(best_acc1, record["val"]["acc1"])
        log.info(
            "epoch %d/%d: train loss %.4f, val top-1 %.2f%% (best %.2f%%), %.0f im/s",
            epoch + 1,
            config.optim.epochs,
            record["train"]["loss"],
            record["val"]["acc1"],
            best_acc1,
            record["train"]["images_per_sec"],
        )
        if out is not None:
            with open(out / "metrics.jsonl", "a") as metrics_log:
                metrics_log.write(json.dumps(record) + "\n")
            state = run.checkpoint_state(epoch + 1, best_acc1, history)
            save_checkpoint(state, out / "checkpoint.pth")
            if improved:
                save_checkpoint(state, out / "best.pth")
    final = history[-1]["val"] if history else {}
    return TrainResult(out, final, best_acc1, teacher_metrics, history, time.perf_counter() - started, run.model)


def _train_and_evaluate_epoch(run: Run, epoch: int) -> dict[str, Any]:
    started = time.perf_counter()
    sampler = run.data.train_loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    train_metrics = train_one_epoch(
        run.model,
        run.criterion,
        run.data.train_loader,
        run.optimizer,
        lr_at=run.schedule,
        first_step=epoch * run.steps_per_epoch,
        device=run.device,
        precision=run.precision,
        teacher=run.teacher,
        mixup=run.mixup,
        accum_steps=run.config.optim.accum_steps,
        ema=run.ema,
        scaler=run.scaler,
        clip_grad=run.config.optim.clip_grad,
        progress=run.config.run.progress,
        description=f"epoch {epoch + 1}/{run.config.optim.epochs}",
    )
    val_metrics = evaluate(
        run.model, run.data.val_loader, device=run.device, precision=run.precision, progress=run.config.run.progress
    )
    record = {"epoch": epoch + 1, "train": train_metrics, "val": val_metrics}
    if run.ema is not None:
        record["val_ema"] = evaluate(
            run.ema.module, run.data.val_loader, device=run.device, precision=run.precision, description="eval EMA"
        )
    record["seconds"] = time.perf_counter() - started
    return record


def _changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's run and this one; the epoch count and run.* may change."""
    changed = []
    for section in ("model", "data", "augment", "optim", "distill"):
        for key, value in current.get(section, {}).items():
            old = saved.get(section, {}).get(key)
            if (section, key) != ("optim", "epochs") and old != value:
                changed.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changed


def _resume(run: Run, path: Path | str) -> tuple[int, float, list[dict[str, Any]]]:
    """Load a checkpoint of this very run into ``run``; returns (next epoch, best top-1, history)."""
    state = load_checkpoint(path)
    if state.get("format") != FORMAT or "optimizer" not in state:
        # weights only (official .pth, timm state dict, an export): as the official code, start from them at epoch 0
        log.info("%s holds weights only (no optimizer or epoch): training starts from them at epoch 0", path)
        load_weights(run.model, weights_of(state, path), source=str(path))
        if run.ema is not None:
            run.ema.load_state_dict(run.model.state_dict())
        return 0, 0.0, []
    theirs = {k: state["model_spec"].get(k) for k in ("name", "num_classes", "in_chans", "img_size")}
    ours = {k: run.spec[k] for k in theirs}
    if theirs != ours:
        raise CheckpointError(
            f"{path} holds another model ({theirs}) than this run builds ({ours}); nothing was loaded"
        )
    changed = _changed_settings(state.get("config", {}), config_to_dict(run.config))
    if changed:
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({'; '.join(changed)}); resume it with its own settings "
            "or train into another --output-dir. Nothing was loaded or overwritten"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["model_ema"] if state.get("model_ema") else state["model"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"], run.data.train_loader.generator)
    return int(state["epoch"]), float(state["best_acc1"]), list(state.get("history", []))
