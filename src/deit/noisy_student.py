"""Noisy Student (Xie et al. 2020) on top of DeiT distillation: k generations of teacher -> pseudo-labels -> student.

Generation 0 is the teacher: a checkpoint you give, or a model trained here
on the labelled images alone. Each generation g = 1..k then

1. runs the previous generation's model on every training image, clean (the
   evaluation transform, no dropout), and stores its probabilities and the
   images to train on (``deit.pseudo_labels``: optional confidence threshold
   and class balancing);
2. trains a noised student (the config's RandAugment, dropout and stochastic
   depth; its model may be larger than the teacher's) on the labelled images
   with their labels and on all kept images with the pseudo-labels, soft or
   hard as ``distill.type`` says;
3. hands its final weights on as the next teacher.

Every generation is a normal run in ``OUTPUT/generation{g}``, so an
interrupted command continues where it stopped (each run resumes from its own
latest checkpoint) and ``noisy_student.json`` lists each generation's
checkpoint and accuracy as soon as it is done.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deit.config import TrainConfig, with_overrides
from deit.data import Unlabeled, build_pool_for_labelling
from deit.data.unlabeled import pool_fingerprint
from deit.distributed import from_environment, resolve_device
from deit.pseudo_labels import PseudoLabels, predict_pool, select
from deit.run import RunError
from deit.teachers import InputSpec, build_teacher
from deit.training import fit

log = logging.getLogger("deit")


@dataclass(frozen=True)
class NoisyStudentPlan:
    generations: int = 2
    threshold: float = 0.0  # drop unlabelled images whose top pseudo-label probability is lower
    balance: bool = False  # the same number of unlabelled images per pseudo-class (the paper does)
    students: tuple[str, ...] = ()  # the student model of each generation; default: the config's model
    teacher_path: str | None = None  # generation 0; None: trained here on the labelled images alone


def make_pseudo_labels(
    config: TrainConfig, teacher_path: str, output: Path, *, threshold: float = 0.0, balance: bool = False
) -> dict[str, Any]:
    """Pseudo-label the run's training pool with ``teacher_path`` into ``output``; returns their statistics."""
    data = config.data
    unlabeled = Unlabeled(data.label_fraction, data.unlabeled_path)
    options = {"seed": config.run.seed, "input_size": data.input_size, "in_chans": data.in_chans}
    options.update(train_subset=data.train_subset, bad_files=data.bad_files)
    pool, info, size = build_pool_for_labelling(data.dataset, data.path, unlabeled=unlabeled, **options)
    device = resolve_device(config.run.device)
    teacher = build_teacher(
        None,
        teacher_path,
        student_input=InputSpec(info.in_chans, info.mean, info.std),
        num_classes=info.num_classes,
        class_names=info.class_names,
        input_size=size,
    ).to(device)
    probs = predict_pool(
        teacher, pool, batch_size=2 * config.optim.batch_size, device=device, num_workers=data.num_workers
    )
    labels = torch.as_tensor(pool.targets)
    selection = select(probs, labels, threshold=threshold, balance=balance, seed=config.run.seed)
    PseudoLabels(probs, selection, info.class_names, teacher_path, pool_fingerprint(pool)).save(output)
    stats = _statistics(probs, labels, selection, config)
    log.info("pseudo-labels from %s: %s", teacher_path, stats)
    return stats


def _statistics(
    probs: torch.Tensor, labels: torch.Tensor, selection: torch.Tensor, config: TrainConfig
) -> dict[str, Any]:
    predicted = probs.argmax(dim=-1)
    hidden = labels < 0
    stats: dict[str, Any] = {
        "pool_images": len(labels),
        "unlabeled_images": int(hidden.sum()),
        "unlabeled_kept": len(selection) - int((~hidden).sum()),  # with class-balancing repeats
        "labeled_accuracy": round(100.0 * (predicted[~hidden] == labels[~hidden]).float().mean().item(), 2),
    }
    if config.data.unlabeled_path is None and hidden.any():
        # a --label-fraction pool hides labels the data set has: measure the pseudo-labels against them
        options = {"seed": config.run.seed, "in_chans": config.data.in_chans, "train_subset": config.data.train_subset}
        full, _, _ = build_pool_for_labelling(
            config.data.dataset, config.data.path, unlabeled=Unlabeled(), bad_files=config.data.bad_files, **options
        )
        truth = torch.as_tensor(full.targets)
        stats["unlabeled_accuracy"] = round(100.0 * (predicted[hidden] == truth[hidden]).float().mean().item(), 2)
    return stats


def run_noisy_student(config: TrainConfig, plan: NoisyStudentPlan, output_dir: str | Path) -> list[dict[str, Any]]:
    """Train ``plan.generations`` students; returns (and writes to noisy_student.json) one record per generation."""
    if config.data.label_fraction is None and config.data.unlabeled_path is None:
        raise RunError("Noisy Student needs unlabelled images: give --label-fraction or --unlabeled-data-path")
    if from_environment().enabled:
        raise RunError(
            "deit noisy-student runs as one process; under torchrun, make each generation's pseudo-labels once with "
            "`deit pseudo-label` and train it with `torchrun ... -m deit train --pseudo-labels FILE`"
        )
    if plan.students and len(plan.students) != plan.generations:
        raise RunError(f"--students names {len(plan.students)} models for {plan.generations} generations")
    out = Path(output_dir)
    records: list[dict[str, Any]] = []
    teacher_path = plan.teacher_path
    if teacher_path is None:
        supervised = _generation_config(config, out / "generation0", {"distill.type": "none"})
        result = fit(supervised)
        teacher_path = str(out / "generation0" / "checkpoint.pth")
        records.append(_record(0, supervised, result.final, teacher_path, None, result.seconds))
        _write(out, records)
    distillation = config.distill.type if config.distill.type != "none" else "soft"
    for generation in range(1, plan.generations + 1):
        folder = out / f"generation{generation}"
        labels_path = folder / "pseudo_labels.safetensors"
        stats = make_pseudo_labels(config, teacher_path, labels_path, threshold=plan.threshold, balance=plan.balance)
        model = plan.students[generation - 1] if plan.students else config.model.name
        student = _generation_config(
            config,
            folder,
            {"model.name": model, "distill.type": distillation, "distill.pseudo_labels": str(labels_path)},
        )
        result = fit(student)
        teacher_path = str(folder / "checkpoint.pth")
        records.append(_record(generation, student, result.final, teacher_path, stats, result.seconds))
        _write(out, records)
    return records


def _generation_config(config: TrainConfig, folder: Path, overrides: dict[str, Any]) -> TrainConfig:
    common = {
        "run.output_dir": str(folder),
        "run.resume": "auto",  # a rerun of the command continues an interrupted generation
        "distill.teacher_path": None,
        "distill.teacher_model": None,
        "distill.teacher_pretrained": False,
        "distill.pseudo_labels": None,
    }
    return with_overrides(config, common | overrides)


def _record(
    generation: int,
    config: TrainConfig,
    final: dict[str, float],
    checkpoint: str,
    pseudo_labels: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    return {
        "generation": generation,
        "model": config.model.name,
        "acc1": final["acc1"],
        "metrics": final,
        "checkpoint": checkpoint,
        "pseudo_labels": pseudo_labels,
        "seconds": seconds,
    }


def _write(out: Path, records: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "noisy_student.json").write_text(json.dumps(records, indent=2) + "\n")
