"""``deit demo``: the paper's distillation table, in miniature, on Fashion-MNIST.

Trains a CNN teacher, then one DeiT student three times with the same seed and
epochs: without distillation, with soft distillation, and with hard
distillation through the class + distillation tokens. Prints and writes the
table (Markdown and JSON) with every head's top-1 and each run's wall time.

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
    epochs: int = 6  # student epochs, the same for every student
    teacher_epochs: int = 3
    train_subset: int | None = None  # class-balanced training images; None: all 60000
    seed: int = 0
    progress: bool = True
    student_preset: str = "fashion_mnist"
    teacher_preset: str = "fashion_mnist_teacher"


@dataclass(frozen=True)
class Student:
    key: str  # folder name under output_dir
    method: str
    label: str  # label supervision, as in the paper's table
    teacher: str  # teacher supervision
    overrides: dict[str, Any]


STUDENTS = (
    Student("none", "DeiT, no distillation", "yes", "none", {"distill.type": "none"}),
    Student(
        "soft",
        "DeiT, soft distillation (tau 1, alpha 0.5)",
        "yes",
        "soft",
        {"distill.type": "soft", "distill.alpha": 0.5, "distill.tau": 1.0},
    ),
    Student(
        "hard",
        "DeiT, hard distillation, class + distillation tokens",
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


def _common_overrides(settings: DemoSettings, epochs: int, folder: Path) -> dict[str, Any]:
    return {
        "data.path": settings.data_path,
        "data.train_subset": settings.train_subset,
        "optim.epochs": epochs,
        "run.seed": settings.seed,
        "run.output_dir": str(folder),
        "run.resume": "auto",
        "run.progress": settings.progress,
    }


def _command(preset: str, config: TrainConfig, extra: str = "") -> str:
    subset = f" --train-subset {config.data.train_subset}" if config.data.train_subset else ""
    data = f" --data-path {config.data.path}" if config.data.path else ""
    return (
        f"deit train --config {preset}{data}{subset} --epochs {config.optim.epochs} --seed {config.run.seed}"
        f"{extra} --output-dir {config.run.output_dir}"
    )


def _wall_minutes(result: TrainResult) -> float:
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
        folder = out / student.key
        config = with_overrides(
            load_config(settings.student_preset),
            {
                **_common_overrides(settings, settings.epochs, folder),
                **student.overrides,
                "distill.teacher_path": str(teacher_dir / "checkpoint.pth") if student.teacher != "none" else None,
                "run.eval_teacher": False,
            },
        )
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
                "cls_acc1": result.final["cls_acc1"],
                "dist_acc1": result.final["dist_acc1"],
                "acc1": result.final["avg_logits_acc1"],
                "softmax_sum_acc1": result.final["softmax_sum_acc1"],
                "minutes": _wall_minutes(result),
                "command": _command(settings.student_preset, config, extra),
            }
        )
    student_config = with_overrides(load_config(settings.student_preset), {})
    markdown = format_table(rows, settings, student_config.model.name)
    markdown_path = out / "results.md"
    json_path = out / "results.json"
    markdown_path.write_text(markdown + "\n")
    json_path.write_text(
        json.dumps({"settings": asdict(settings), "student": student_config.model.name, "rows": rows}, indent=2)
    )
    return DemoReport(rows, markdown, markdown_path, json_path)


def format_table(rows: list[dict[str, Any]], settings: DemoSettings, student_name: str) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    subset = f"{settings.train_subset} training images" if settings.train_subset else "all 60000 training images"
    lines = [
        f"Fashion-MNIST, {subset}, 10000 test images; student {student_name}, {settings.epochs} epochs; "
        f"teacher {settings.teacher_epochs} epochs; seed {settings.seed}. Top-1 accuracy in %.",
        "",
        "| method | label | teacher | class head | dist. head | fused: avg logits | fused: softmax sum | wall time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['label']} | {row['teacher']} | {pct(row['cls_acc1'])} | {pct(row['dist_acc1'])} "
            f"| {pct(row['acc1'])} | {pct(row['softmax_sum_acc1'])} | {row['minutes']:.1f} min |"
        )
    return "\n".join(lines)
