"""Continuing a run from its checkpoint, at an epoch boundary or in the middle of an epoch.

A checkpoint of a run holds the weights, the EMA, the optimizer and scaler,
where the run is (epoch, step in the epoch) and every process's loss sums
for the epoch in progress. Nothing else is needed to repeat the uninterrupted
run bit for bit: the sampler's order and every random draw are functions of
(seed, epoch, step) (see ``deit.rng``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deit.checkpoint import Checkpoint, CheckpointError, is_deit_checkpoint, load_checkpoint, weights_of
from deit.config import TrainConfig, config_to_dict
from deit.engine import EpochMeter
from deit.models import load_weights
from deit.run import Progress, Run, RunError
from deit.teacher_cache import TeacherCache

log = logging.getLogger("deit")


def resume_source(config: TrainConfig, out: Path | None) -> Path | str | None:
    """The checkpoint ``--resume`` names: a path or URL, or for ``auto`` the output directory's latest (if any)."""
    if config.run.resume is None:
        return None
    if config.run.resume == "auto":
        if out is None:
            raise RunError("--resume auto needs --output-dir")
        latest = out / "checkpoint.pth"
        return latest if latest.exists() else None  # nothing yet: start from scratch
    return config.run.resume


# settings a resumed run may change (run.* may change too): they do not change what is computed, or the teacher's
# memory format only at rounding level. The attention kernel is compared as the run resolved it (its model spec),
# so that "auto" resumes a run that named the kernel it resolves to.
RESUMABLE_CHANGES = {("optim", "epochs"), ("data", "num_workers"), ("distill", "teacher_channels_last"),
                     ("model", "attn_impl")}  # fmt: skip


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's run and this one, except RESUMABLE_CHANGES and run.*."""
    changed = []
    for section in ("model", "data", "augment", "optim", "distill", "pretrain"):
        for key, value in current.get(section, {}).items():
            old = saved.get(section, {}).get(key)
            if (section, key) not in RESUMABLE_CHANGES and old != value:
                changed.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changed


def resume(run: Run, path: Path | str) -> Progress:
    """Load a checkpoint of this very run into ``run`` and return where it was.

    A file that holds weights only (an official ``.pth``, a timm state dict, an
    export) starts the run from those weights at epoch 0, as the official code
    does with ``--resume``.
    """
    state = load_checkpoint(path)
    checkpoint = Checkpoint.from_state(state, path) if is_deit_checkpoint(state) else None
    if checkpoint is None or not checkpoint.resumable:
        log.info("%s holds weights only (no optimizer or epoch): training starts from them at epoch 0", path)
        load_weights(run.model, weights_of(state, path), source=str(path))
        if run.ema is not None:
            run.ema.load_state_dict(run.model.state_dict())
        return Progress()
    _check_same_run(run, checkpoint, path)
    run.model.load_state_dict(checkpoint.model)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint.model_ema or checkpoint.model)
    if run.scaler is not None and checkpoint.scaler:
        run.scaler.load_state_dict(checkpoint.scaler)
    if isinstance(run.teacher, TeacherCache) and checkpoint.teacher_cache:
        run.teacher.logits.copy_(checkpoint.teacher_cache["logits"])
        run.teacher.filled.copy_(checkpoint.teacher_cache["filled"])
    return Progress(
        epoch=checkpoint.epoch,
        epoch_step=checkpoint.epoch_step,
        best_acc1=checkpoint.best_acc1,
        history=checkpoint.history,
        meter=_my_meter(run, checkpoint),
    )


def _check_same_run(run: Run, checkpoint: Checkpoint, path: Path | str) -> None:
    identity = ("name", "num_classes", "in_chans", "img_size")
    theirs = {k: getattr(checkpoint.model_spec, k) for k in identity}
    ours = {k: getattr(run.spec, k) for k in identity}
    if theirs != ours:
        raise CheckpointError(
            f"{path} holds another model ({theirs}) than this run builds ({ours}); nothing was loaded"
        )
    changed = changed_settings(checkpoint.config, config_to_dict(run.config))
    kernels = checkpoint.model_spec.options.get("attn_impl"), run.spec.options.get("attn_impl")
    if kernels[0] != kernels[1]:
        changed.append(f"attention kernel: {kernels[0]!r} -> {kernels[1]!r}")
    if changed:
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({'; '.join(changed)}); resume it with its own settings "
            "or train into another --output-dir. Nothing was loaded or overwritten"
        )
    saved_world = checkpoint.world_size
    if saved_world != run.layout.world_size:
        log.warning(
            "%s was written by %d processes and this run has %d: the global batch and the order of the images "
            "change from here on, so the run continues but does not repeat the original one exactly",
            path,
            saved_world,
            run.layout.world_size,
        )


def _my_meter(run: Run, checkpoint: Checkpoint) -> EpochMeter:
    """This process's loss sums for the epoch in progress; on another process count, rank 0 takes them all."""
    meters = checkpoint.meters
    if not meters or not checkpoint.epoch_step:
        return EpochMeter()
    if len(meters) == run.layout.world_size:
        return EpochMeter.from_state(meters[run.layout.rank], run.device)
    if run.layout.rank != 0:
        return EpochMeter()
    merged = EpochMeter.from_state(meters[0], run.device)
    for other in meters[1:]:  # sums and counts add up, so the epoch's means stay right
        extra = EpochMeter.from_state(other, run.device)
        merged.sums = {name: merged.sums[name] + extra.sums[name] for name in merged.sums}
        merged.micro_batches += extra.micro_batches
        merged.images += extra.images
    return merged
