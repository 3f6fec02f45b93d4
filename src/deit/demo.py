"""``deit demo``: the paper's distillation table, in miniature, on Fashion-MNIST.

Trains a CNN teacher, then the DeiT student three times with the same seed,
data and epochs, in the data-limited regime of the ``fashion_mnist_data_limited``
preset (2,000 images, 100 epochs, the paper's augmentation): without
distillation, with soft distillation, and with hard distillation through the
class + distillation tokens. Prints and writes the table (Markdown and JSON)
with every head's top-1, each run's wall time, and the distilled student's
gain over the undistilled one.

Each run lives in its own folder under ``output_dir`` and is resumed if it is
already there, so an interrupted demo picks up where it stopped and a finished
one prints its table again at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deit.config import TrainConfig, load_config, with_overrides
from deit.training import TrainResult, fit

log = logging.getLogger("deit")


@dataclass(frozen=True)
class DemoSettings:
    output_dir: str = "runs/demo"
    data_path: str | None = None  # Fashion-MNIST IDX files; default: Debian's copy
    epochs: int | None = None  # student epochs, the same for every student; None: the student preset's
    teacher_epochs: int | None = None  # None: the teacher preset's
    train_subset: int | None = None  # class-balanced training images; None: the student preset's
    seed: int = 0
    progress: bool = True
    student_preset: str = "fashion_mnist_data_limited"
    teacher_preset: str = "fashion_mnist_teacher_fast"


@dataclass(frozen=True)
class Student:
    key: str  # folder name under output_dir
    method: str
    label: str  # label supervision, as in the paper's table
    teacher: str  # teacher supervision
    overrides: dict[str, Any]


STUDENTS = (  # the undistilled and soft rows have no distillation token, as in the paper's table
    Student(
        "none", "DeiT, no distillation", "yes", "none", {"model.name": "deit_nano_patch7_28", "distill.type": "none"}
    ),
    Student(  # the paper's soft distillation: tau 3, lambda 0.1, KL summed over classes, mean over the batch
        "soft",
        "DeiT, soft distillation (paper: tau 3, lambda 0.1)",
        "yes",
        "soft",
        {"model.name": "deit_nano_patch7_28", "distill.type": "soft", "distill.alpha": 0.1, "distill.tau": 3.0},
    ),
    Student(
        "hard",
        "DeiT⚗, hard distillation, class + distillation tokens",
        "yes",
        "hard",
        {"distill.type": "hard", "distill.alpha": 0.5},
    ),
)


@dataclass(frozen=True)
class DemoReport:
    rows: list[dict[str, Any]]
    markdown: str
    markdown_path: Path
    json_path: Path


def _common_overrides(settings: DemoSettings, epochs: int | None, folder: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "data.path": settings.data_path,
        "run.seed": settings.seed,
        "run.output_dir": str(folder),
        "run.resume": "auto",
        "run.progress": settings.progress,
    }
    if epochs is not None:
        overrides["optim.epochs"] = epochs
    return overrides


def _command(preset: str, config: TrainConfig, extra: str = "") -> str:
    subset = f" --train-subset {config.data.train_subset}" if config.data.train_subset else ""
    data = f" --data-path {config.data.path}" if config.data.path else ""
    return (
        f"deit train --config {preset} --model {config.model.name}{data}{subset} --epochs {config.optim.epochs} "
        f"--seed {config.run.seed}{extra} --output-dir {config.run.output_dir}"
    )


def _student_config(settings: DemoSettings, student: Student, out: Path, teacher: Path) -> TrainConfig:
    subset = {"data.train_subset": settings.train_subset} if settings.train_subset else {}
    overrides = {
        **_common_overrides(settings, settings.epochs, out / student.key),
        **subset,
        **student.overrides,
        "distill.teacher_path": str(teacher) if student.teacher != "none" else None,
        "run.eval_teacher": False,
    }
    return with_overrides(load_config(settings.student_preset), overrides)


def _wall_minutes(result: TrainResult) -> float:
    """Training time summed over epochs (evaluations excluded), also right for a run read back finished."""
    return sum(record.get("seconds", 0.0) for record in result.history) / 60


def run_demo(settings: DemoSettings) -> DemoReport:
    out = Path(settings.output_dir)
    teacher_dir = out / "teacher"
    teacher_config = with_overrides(
        load_config(settings.teacher_preset), _common_overrides(settings, settings.teacher_epochs, teacher_dir)
    )
    log.info("demo 1/4: teacher %s", teacher_config.model.name)
    teacher = fit(teacher_config)
    rows = [
        {
            "method": f"Teacher: {teacher_config.model.name} (CNN)",
            "label": "yes",
            "teacher": "n/a",
            "cls_acc1": None,
            "dist_acc1": None,
            "acc1": teacher.final["acc1"],
            "softmax_sum_acc1": None,
            "minutes": _wall_minutes(teacher),
            "command": _command(settings.teacher_preset, teacher_config),
        }
    ]
    for index, student in enumerate(STUDENTS, start=2):
        config = _student_config(settings, student, out, teacher_dir / "checkpoint.pth")
        log.info("demo %d/4: %s", index, student.method)
        result = fit(config)
        extra = (
            f" --distillation-type {config.distill.type} --distillation-alpha {config.distill.alpha}"
            + (f" --distillation-tau {config.distill.tau}" if config.distill.type == "soft" else "")
            + (f" --teacher-path {config.distill.teacher_path}" if config.distill.teacher_path else "")
        )
        rows.append(
            {
                "method": student.method,
                "label": student.label,
                "teacher": student.teacher,
                "cls_acc1": result.final.get("cls_acc1"),
                "dist_acc1": result.final.get("dist_acc1"),
                "acc1": result.final.get("avg_logits_acc1", result.final["acc1"]),
                "softmax_sum_acc1": result.final.get("softmax_sum_acc1"),
                "minutes": _wall_minutes(result),
                "command": _command(settings.student_preset, config, extra),
            }
        )
    student_config = _student_config(settings, STUDENTS[-1], out, teacher_dir / "checkpoint.pth")
    markdown = format_table(rows, student_config, teacher_config)
    markdown_path = out / "results.md"
    json_path = out / "results.json"
    markdown_path.write_text(markdown + "\n")
    json_path.write_text(
        json.dumps({"settings": asdict(settings), "student": student_config.model.name, "rows": rows}, indent=2)
    )
    return DemoReport(rows, markdown, markdown_path, json_path)


def format_table(rows: list[dict[str, Any]], student: TrainConfig, teacher: TrainConfig) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    subset = student.data.train_subset or 60000
    augment = student.augment
    lines = [
        f"Fashion-MNIST, {subset} training images, 10000 test images; students {student.optim.epochs} epochs "
        f"(RandAugment {augment.rand_augment or 'off'}, Random Erasing {augment.random_erasing}, Mixup "
        f"{augment.mixup}, CutMix {augment.cutmix}); teacher {teacher.model.name}, {teacher.optim.epochs} epochs on "
        f"all 60000 images; seed {student.run.seed}. Top-1 accuracy in %.",
        "",
        "| method | label | teacher | class head | dist. head | fused: avg logits | fused: softmax sum | wall time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['label']} | {row['teacher']} | {pct(row['cls_acc1'])} | {pct(row['dist_acc1'])} "
            f"| {pct(row['acc1'])} | {pct(row['softmax_sum_acc1'])} | {row['minutes']:.1f} min |"
        )
    by_teacher = {row["teacher"]: row["acc1"] for row in rows}
    if {"none", "hard"} <= set(by_teacher):
        lines += [
            "",
            f"Class + distillation tokens against no distillation: {by_teacher['hard'] - by_teacher['none']:+.2f} "
            "points (the run-to-run spread of this budget is in benchmarks/results/distillation_table.md).",
        ]
    return "\n".join(lines)
