"""A whole training run from a config: train, evaluate, log, checkpoint, stop cleanly, resume exactly.

``fit(config)`` is what ``deit train`` calls, on one process or on each
process torchrun starts. Output directory layout (written by rank 0 only):

    config.yaml       the resolved config
    metrics.jsonl     one JSON record per epoch (train losses, every head's accuracy)
    steps.jsonl       one JSON record per optimizer step (loss averaged over processes, learning rate)
    checkpoint.pth    the latest epoch, or step with --checkpoint-steps / on SIGTERM; written atomically
    best.pth          the epoch with the best validation top-1
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.config import TrainConfig, save_config
from deit.data.samplers import EpochSampler, MixedEpochSampler
from deit.distributed import (
    Distributed,
    destroy_process_group,
    from_environment,
    init_process_group,
    resolve_device,
)
from deit.engine import EpochMeter, NonFiniteLossError, evaluate, train_steps
from deit.files import atomic_path
from deit.interrupts import RunInterrupted, StopRequest, stop_on_signals
from deit.progress import StepProgress
from deit.pseudo_labels import PseudoLabelTeacher
from deit.resume import resume, resume_source
from deit.run import Progress, Run, RunError, build_run, model_options
from deit.ssl.method import Method
from deit.ssl.pretrain import epoch_context, knn_monitor
from deit.teacher_cache import TeacherCache

__all__ = ["RunError", "RunInterrupted", "TrainResult", "fit", "model_options"]

log = logging.getLogger("deit")


@dataclass
class TrainResult:
    output_dir: Path | None
    final: dict[str, float]  # validation metrics after the last epoch
    best_acc1: float
    teacher: dict[str, float] | None  # the teacher's validation metrics, when there is one
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = None


def fit(config: TrainConfig, stop: StopRequest | None = None) -> TrainResult:
    """Train as ``config`` says, on this process and the others torchrun started, and return the metrics.

    SIGTERM / SIGINT (or ``stop.request``) end the run after the current step with a checkpoint, raising
    ``RunInterrupted``; a non-finite loss raises ``NonFiniteLossError`` on every process, writing nothing.
    """
    started = time.perf_counter()
    layout = from_environment()
    stop = stop or StopRequest()
    with _process_group(layout, resolve_device(config.run.device, layout)), stop_on_signals(stop):
        out = _output_dir(config, layout)
        run = build_run(config, layout)
        _log_start(run)
        progress = _resume_or_start(run, out)
        if isinstance(run.model, Method) and (description := run.model.describe()):
            log.info(description)
        with RunLogs(out if layout.is_main else None, config.run.tensorboard) as logs:
            logs.start(config, progress, first_step=progress.epoch * run.steps_per_epoch + progress.epoch_step)
            teacher_metrics = _evaluate_teacher(run)
            for epoch in range(progress.epoch, config.optim.epochs):
                record = _train_epoch(run, epoch, progress, logs, stop)
                if _evaluates(epoch, config.optim.epochs, config.run.eval_interval):
                    _evaluate_epoch(run, record, teacher_metrics)
                _end_epoch(run, progress, record, logs)
                if _stop_agreed(run, stop):  # a signal during the evaluation: the epoch's checkpoint is written
                    raise RunInterrupted(stop.signal_number or signal.SIGTERM, logs.checkpoint_name)
    final = progress.history[-1].get("val", {}) if progress.history else {}
    seconds = time.perf_counter() - started
    return TrainResult(logs.out, final, progress.best_acc1, teacher_metrics, progress.history, seconds, run.model)


def _train_epoch(run: Run, epoch: int, progress: Progress, logs: RunLogs, stop: StopRequest) -> dict[str, Any]:
    """Train the rest of ``epoch``; between steps, log each one, checkpoint when asked, and stop on a signal."""
    config, layout = run.config, run.layout
    started, images_before = time.perf_counter(), progress.meter.images
    notes = {}
    if isinstance(run.model, Method):  # DeepCluster clusters here; a resumed epoch keeps its clusters
        context = epoch_context(run.data, device=run.device, precision=run.precision, optimizer=run.optimizer,
                                layout=layout)  # fmt: skip
        notes = run.model.before_epoch(epoch, context)
        _draw_by(run.data.train_sampler, run.model.sample_weights())  # DeepCluster: uniform over its clusters
    run.data.train_sampler.set_epoch(
        epoch, start=progress.epoch_step * config.optim.accum_steps * config.optim.batch_size
    )
    if isinstance(run.teacher, TeacherCache):
        run.teacher.set_epoch(epoch)
    steps_left = run.steps_per_epoch - progress.epoch_step
    # a bar on a terminal; in a log file, a line every log_interval steps
    report = StepProgress(
        steps_left,
        f"epoch {epoch + 1}/{config.optim.epochs}",
        enabled=config.run.progress and layout.is_main,
        log_interval=config.run.log_interval,
    )
    records = train_steps(
        run.step_parts(),
        run.data.train_loader,
        first_step=epoch * run.steps_per_epoch + progress.epoch_step,
        steps=steps_left,
        meter=progress.meter,
        reduce=layout.sum if layout.enabled else None,
        stop_requested=lambda: stop.requested,
    )
    for record in records:
        if record.nonfinite:
            raise NonFiniteLossError(
                f"the loss is not finite at step {record.step} on {record.nonfinite} of {layout.world_size} "
                "process(es); stopping without taking the step. The last checkpoint holds the weights before it: "
                "lower --lr, or set --clip-grad"
            )
        progress.epoch_step += 1
        logs.step({"step": record.step, "epoch": epoch + 1, "loss": record.loss, "lr": record.lr})
        report.update(record.images, loss=record.loss, lr=record.lr)
        if record.stop:  # also at an epoch's last step: the epoch's evaluation then runs after the resume
            logs.checkpoint(run, progress)
            log.warning("stop requested: checkpoint written after step %d", record.step + 1)
            raise RunInterrupted(stop.signal_number or signal.SIGTERM, logs.checkpoint_name)
        every = config.run.checkpoint_steps
        if every and progress.epoch_step % every == 0 and progress.epoch_step < run.steps_per_epoch:
            logs.checkpoint(run, progress)  # the epoch's own checkpoint follows its evaluation
    report.close()
    seconds = time.perf_counter() - started
    train = progress.meter.means(layout.sum)  # losses over every process's micro-batches
    rate = torch.tensor((progress.meter.images - images_before) / max(seconds, 1e-9))
    train.update(
        lr=progress.meter.lr, steps=run.steps_per_epoch, images_per_sec=layout.sum(rate).item(), seconds=seconds
    )
    return {"epoch": epoch + 1, "train": train, "seconds": seconds, **notes}


def _draw_by(sampler: EpochSampler | MixedEpochSampler, weights: torch.Tensor | None) -> None:
    """Let the method's weights (None: none) decide how the coming epoch draws its images."""
    if isinstance(sampler, EpochSampler):
        sampler.draw_by(weights)
    elif weights is not None:
        raise RunError("this method draws the training images by its own weights, which a pool of labelled and "
                       "unlabelled images cannot: pretrain without --label-fraction or unlabelled images")  # fmt: skip


def _stop_agreed(run: Run, stop: StopRequest) -> bool:
    """At an epoch's end (after its checkpoint): did any process get a stop request?"""
    return bool(run.layout.sum(torch.tensor(float(stop.requested))) > 0)


@contextlib.contextmanager
def _process_group(layout: Distributed, device: torch.device) -> Iterator[None]:
    init_process_group(layout, device)
    try:
        yield
    finally:
        destroy_process_group()


def _resume_or_start(run: Run, out: Path | None) -> Progress:
    source = resume_source(run.config, out)
    if source is None:
        return Progress()
    progress = resume(run, source)
    log.info("resumed from %s at epoch %d, step %d", source, progress.epoch, progress.epoch_step)
    return progress


def _evaluates(epoch: int, epochs: int, interval: int) -> bool:
    """Whether epoch ``epoch`` (from 0) ends with an evaluation: every ``interval`` epochs, and the last."""
    return (epoch + 1) % interval == 0 or epoch + 1 == epochs


def _evaluate_epoch(run: Run, record: dict[str, Any], teacher_metrics: dict[str, float] | None) -> None:
    config, layout = run.config, run.layout
    if isinstance(run.model, Method):  # self-supervised: the backbone's features, scored by kNN
        if len(run.data.val_loader.dataset) == 0:
            return  # a folder of unlabelled images: nothing to score the features on
        record["val"] = knn_monitor(run.model, run.data, config.pretrain, device=run.device, precision=run.precision,
                                    reduce=layout.sum)  # fmt: skip
        return
    record["val"] = evaluate(
        run.model,
        run.data.val_loader,
        device=run.device,
        precision=run.precision,
        progress=config.run.progress and layout.is_main,
        reduce=layout.sum,
    )
    if run.ema is not None:
        record["val_ema"] = evaluate(
            run.ema.module, run.data.val_loader, device=run.device, precision=run.precision, reduce=layout.sum
        )
    if teacher_metrics is not None:
        record["teacher"] = teacher_metrics


def _output_dir(config: TrainConfig, layout: Distributed) -> Path | None:
    if config.run.output_dir is None:
        return None
    out = Path(config.run.output_dir)
    if (out / "checkpoint.pth").exists() and config.run.resume is None:
        raise RunError(
            f"{out} already holds a run (checkpoint.pth): add --resume auto to continue it, "
            "or choose another --output-dir; nothing was overwritten"
        )
    if layout.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _log_start(run: Run) -> None:
    log.info(
        "model %s (%.2fM parameters), %s, %d training / %d validation images at %d px, %s, lr %.2e, %d process(es)",
        run.config.model.name,
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        run.data.info.name,
        len(run.data.train_loader.dataset),
        len(run.data.val_loader.dataset),
        run.data.input_size,
        run.precision.describe(),
        run.schedule.peak_lr,
        run.layout.world_size,
    )


def _evaluate_teacher(run: Run) -> dict[str, float] | None:
    if run.teacher is None or not run.config.run.eval_teacher or isinstance(run.teacher, PseudoLabelTeacher):
        return None  # stored pseudo-labels exist for the training images only
    metrics = evaluate(
        run.teacher,
        run.data.val_loader,
        device=run.device,
        precision=run.precision,
        description="teacher",
        reduce=run.layout.sum,
    )
    log.info("teacher %s: top-1 %.2f%% on the validation set", run.teacher.name, metrics["acc1"])
    return metrics


def _end_epoch(run: Run, progress: Progress, record: dict[str, Any], logs: RunLogs) -> None:
    progress.history.append(record)
    progress.epoch, progress.epoch_step, progress.meter = record["epoch"], 0, EpochMeter()
    epoch_line = f"epoch {record['epoch']}/{run.config.optim.epochs}: train loss {record['train']['loss']:.4f}"
    improved = False
    if "val" in record:  # not every epoch is evaluated with --eval-interval
        improved = record["val"]["acc1"] > progress.best_acc1
        progress.best_acc1 = max(progress.best_acc1, record["val"]["acc1"])
        scored = "kNN top-1" if isinstance(run.model, Method) else "val top-1"
        epoch_line += f", {scored} {record['val']['acc1']:.2f}% (best {progress.best_acc1:.2f}%)"
    log.info("%s, %.0f im/s", epoch_line, record["train"]["images_per_sec"])
    logs.epoch(record)
    logs.checkpoint(run, progress, best=improved)


class RunLogs:
    """The files of a run's output directory; a no-op without one (and on every process but rank 0)."""

    def __init__(self, out: Path | None, tensorboard: str | None = None) -> None:
        self.out = out
        self.checkpoint_name = str(out / "checkpoint.pth") if out is not None else None
        self.writer = _tensorboard_writer(tensorboard) if tensorboard else None

    def start(self, config: TrainConfig, progress: Progress, first_step: int) -> None:
        """Write the config, and cut the logs back to the checkpoint (a killed run may have logged further)."""
        if self.out is None:
            return
        save_config(config, self.out / "config.yaml")
        self._rewrite(self.out / "metrics.jsonl", progress.history)
        steps = self.out / "steps.jsonl"
        if steps.exists():
            records = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
            self._rewrite(steps, [record for record in records if record["step"] < first_step])

    def step(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / "steps.jsonl", "a") as steps:
                steps.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("step/loss", record["loss"], record["step"])
            self.writer.add_scalar("step/lr", record["lr"], record["step"])

    def epoch(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for section in ("train", "val", "val_ema"):
                for key, value in record.get(section, {}).items():
                    self.writer.add_scalar(f"{section}/{key}", value, record["epoch"])
            self.writer.flush()

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.writer is not None:
            self.writer.close()

    def checkpoint(self, run: Run, progress: Progress, best: bool = False) -> None:
        """Every process takes part (their epoch sums are gathered); rank 0 writes."""
        _check_finite(run.model)  # on every process: the weights are the same, so all stop together
        meters = run.layout.gather(progress.meter.state_dict())
        if self.out is None:
            return
        checkpoint = run.checkpoint(progress, meters)
        checkpoint.save(self.out / "checkpoint.pth")
        if best:
            checkpoint.save(self.out / "best.pth")

    @staticmethod
    def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in records))


def _tensorboard_writer(log_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RunError("--tensorboard needs the tensorboard package: pip install 'deit[tensorboard]'") from error
    return SummaryWriter(log_dir)


def _check_finite(model: nn.Module) -> None:
    """Refuse to write weights that are NaN or infinite: the last good checkpoint stays."""
    weights = model.state_dict().items()
    bad = [name for name, value in weights if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise NonFiniteLossError(f"the weights are no longer finite ({bad[:3]}...); no checkpoint was written")
