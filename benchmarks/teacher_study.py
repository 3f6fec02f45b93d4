"""Which teacher teaches best? The paper's Tables 2–3 claims, measured on Fashion-MNIST.

The same DeiT⚗ student (class + distillation tokens, hard distillation, the distillation table's data-limited
budget) learns from:

* CNN teachers of seven strengths: the table's small-image ResNet-14 trained for 1, 3 and 20 epochs, and on
  1,500, 3,000 and 6,000 images, and the ResNet-8 teacher of an earlier version of the table;
* a transformer teacher: a DeiT without distillation trained here on all 60,000 images, whose accuracy falls
  within a point of one of the CNN teachers, so that the two can be compared at equal accuracy.

It also writes the agreement table of the distillation table's main run (`deit analyze`): does the distilled
student agree more with its CNN teacher than the undistilled student does?

    python benchmarks/teacher_study.py                     # after benchmarks/distillation_table.py

Teachers live under --teacher-dir and students under --work-dir; finished runs are read, not retrained.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from distillation_table import (
    DISTILLED_STUDENT,
    RUNS,
    add_student_budget,
    commit,
    late_movement,
    mean_std,
    student_config,
    train_or_read,
)

from deit.checkpoint import Checkpoint
from deit.config import load_config, with_overrides
from deit.data.datasets import load_fashion_mnist


@dataclass(frozen=True)
class TeacherSpec:
    key: str
    description: str
    kind: str  # "CNN" or "transformer"
    preset: str
    overrides: dict = field(default_factory=dict)


CNN_PRESET = "fashion_mnist_teacher_strong"
TEACHERS = (
    TeacherSpec("cnn_1_epoch", "small-image ResNet-14, 1 epoch", "CNN", CNN_PRESET, {"optim.epochs": 1}),
    TeacherSpec("cnn_3_epochs", "small-image ResNet-14, 3 epochs", "CNN", CNN_PRESET, {"optim.epochs": 3}),
    TeacherSpec(
        "resnet8_small_10ep",
        "small-image ResNet-8, 10 epochs, fp32, no Random Erasing",
        "CNN",
        CNN_PRESET,
        {"model.name": "resnet8_small", "optim.epochs": 10, "augment.random_erasing": 0.0, "run.amp": "none"},
    ),
    TeacherSpec("cnn_table", "small-image ResNet-14, 20 epochs (the table's teacher)", "CNN", CNN_PRESET),
    # weaker CNNs, trained on fewer images, to match the transformer teacher's accuracy (84.6 % measured)
    TeacherSpec("cnn_1500_images", "small-image ResNet-14, 20 epochs on 1,500 images", "CNN", CNN_PRESET,
                {"data.train_subset": 1500}),
    TeacherSpec("cnn_3000_images", "small-image ResNet-14, 20 epochs on 3,000 images", "CNN", CNN_PRESET,
                {"data.train_subset": 3000}),
    TeacherSpec("cnn_6000_images", "small-image ResNet-14, 20 epochs on 6,000 images", "CNN", CNN_PRESET,
                {"data.train_subset": 6000}),
    TeacherSpec(
        "deit_nano_8_epochs",
        "DeiT-nano/7 without distillation, 8 epochs",
        "transformer",
        "fashion_mnist",
        {"model.name": "deit_nano_patch7_28", "optim.epochs": 8, "optim.warmup_epochs": 1},
    ),
)  # fmt: skip
TABLE_TEACHER = "cnn_table"  # trained by the distillation table at runs/teachers/<preset>/seed0
EQUAL_ACCURACY = 1.0  # points: two teachers this close count as equally accurate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_student_budget(parser)  # give it the distillation table's flags, so that its main run is reused
    parser.add_argument("--seeds", type=int, default=2, help="student seeds per teacher")
    parser.add_argument("--teacher-root", default="runs/teachers")
    parser.add_argument("--table-dir", default="runs/distillation_table", help="the distillation table's runs")
    parser.add_argument("--work-dir", default="runs/teacher_study")
    parser.add_argument("--output", default="benchmarks/results/teacher_study.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def teacher_folder(args: argparse.Namespace, spec: TeacherSpec) -> Path:
    if spec.key == TABLE_TEACHER:
        return Path(args.teacher_root) / spec.preset / "seed0"
    return Path(args.teacher_root) / spec.key / "seed0"


def train_teacher(args: argparse.Namespace, spec: TeacherSpec) -> dict:
    folder = teacher_folder(args, spec)
    config = with_overrides(
        load_config(spec.preset),
        {
            **spec.overrides,
            "run.seed": 0,
            "run.output_dir": str(folder),
            "run.resume": "auto",
            "run.progress": not args.no_progress,
        },
    )
    return train_or_read(config, folder)


def train_student(args: argparse.Namespace, spec: TeacherSpec, seed: int) -> dict:
    """The table's DeiT⚗ run, taught by ``spec``; the table's own runs are reused for its teacher."""
    token = next(run for run in RUNS if run.key == "token")
    work = args.table_dir if spec.key == TABLE_TEACHER else str(Path(args.work_dir) / spec.key)
    settings = argparse.Namespace(**{**vars(args), "work_dir": work})
    config = student_config(settings, token, seed, teacher_folder(args, spec) / "checkpoint.pth")
    return train_or_read(config, Path(config.run.output_dir))


@torch.no_grad()
def predictions(checkpoint: Path) -> torch.Tensor:
    """The class a checkpoint's model predicts for each of the 10,000 test images (a distilled one: fused)."""
    saved = Checkpoint.load(checkpoint)
    model = saved.build_model().eval()
    loader, _ = saved.eval_data(batch_size=1000)
    return torch.cat([model(images).argmax(dim=1) for images, _ in loader])


def copied(args: argparse.Namespace) -> list[str]:
    """How much of its teacher each seed-0 student copies: agreement on the test images, right and wrong."""
    _, test = load_fashion_mnist(None, False)
    truth = test.labels
    lines = [
        "How much of its teacher each student (seed 0) copies, on the 10,000 test images: the share of images "
        "where the two predict the same class, overall and where the teacher is wrong (there the student copies "
        "the mistake, or not).",
        "",
        "| teacher | teacher wrong on | same class, all images (%) | same class where the teacher is wrong (%) |",
        "|---|---:|---:|---:|",
    ]
    for spec in TEACHERS:
        work = Path(args.table_dir) if spec.key == TABLE_TEACHER else Path(args.work_dir) / spec.key
        student = work / "token" / "seed0" / "checkpoint.pth"
        teacher = teacher_folder(args, spec) / "checkpoint.pth"
        if not (student.is_file() and teacher.is_file()):
            continue
        taught, said = predictions(student), predictions(teacher)
        wrong = said != truth
        lines.append(
            f"| {spec.description} | {int(wrong.sum())} | {100 * (taught == said).float().mean():.2f} | "
            f"{100 * (taught[wrong] == said[wrong]).float().mean():.2f} |"
        )
    return lines


def agreement(args: argparse.Namespace) -> list[str]:
    """The agreement table of the main run (seed 0): distilled and undistilled students against the CNN teacher."""
    from deit.analysis.analyze import analyze_checkpoint

    table = Path(args.table_dir)
    distilled, baseline = table / "token" / "seed0" / "checkpoint.pth", table / "none" / "seed0" / "checkpoint.pth"
    teacher = teacher_folder(args, next(t for t in TEACHERS if t.key == TABLE_TEACHER)) / "checkpoint.pth"
    if not (distilled.is_file() and baseline.is_file() and teacher.is_file()):
        return ["The agreement table needs the distillation table's seed-0 runs: not there yet."]
    result = analyze_checkpoint(str(distilled), str(Path(args.work_dir) / "analysis"), teacher=str(teacher),
                                baseline=str(baseline), num_images=4)  # fmt: skip
    names = result["agreement"]["predictors"]
    lines = [
        f"Agreement (% of the 10000 test images on which two predictors give the same class), "
        f"`deit analyze --checkpoint {distilled} --teacher {teacher} --baseline {baseline}`:",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for name, row in zip(names, result["agreement"]["percent"], strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{value:.2f}" for value in row) + " |")
    return lines


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    teachers, students = {}, {}
    for spec in TEACHERS:
        logging.info("teacher %s", spec.key)
        teachers[spec.key] = train_teacher(args, spec)
    for seed in range(args.seeds):
        for spec in TEACHERS:
            logging.info("student seed %d from %s", seed, spec.key)
            students.setdefault(spec.key, []).append(train_student(args, spec, seed))
    lines = [
        "# Which teacher teaches best (Fashion-MNIST)",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/teacher_study.py', *argv])}`",
        "",
        f"Student: `{DISTILLED_STUDENT}`, hard distillation through the class + distillation tokens, "
        f"{args.train_subset} class-balanced training images, {args.epochs} epochs, the distillation table's "
        f"augmentation (RandAugment {args.rand_augment or 'off'}, Random Erasing {args.random_erasing}, Mixup "
        f"{args.mixup}, CutMix {args.cutmix}, {args.views or 'no'} fixed views); seeds 0–{args.seeds - 1}. "
        "Each teacher is trained once (seed 0), on all "
        f"60000 images unless its row says otherwise. Measured at commit {commit()}; this invocation took "
        f"{(time.perf_counter() - started) / 60:.0f} min (finished runs are read, not retrained).",
        "",
        "A seed draws the student's 2,000 images, the same for every teacher, so the students of one seed are "
        "compared on the same images: the last column is each student against the table's teacher's, seed by seed.",
        "",
        "| teacher | kind | teacher top-1 (%) | student top-1, class + distillation (%) | per seed "
        "| student late movement | against the table's teacher, same seed |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    table_values = [run["final"]["avg_logits_acc1"] for run in students[TABLE_TEACHER]]
    for spec in sorted(TEACHERS, key=lambda spec: teachers[spec.key]["final"]["acc1"]):
        runs = students[spec.key]
        values = [run["final"]["avg_logits_acc1"] for run in runs]
        moves = [late_movement(run["history"], "avg_logits_acc1") for run in runs]
        paired = [value - base for value, base in zip(values, table_values, strict=True)]
        lines.append(
            f"| {spec.description} | {spec.kind} | {teachers[spec.key]['final']['acc1']:.2f} | {mean_std(values)} | "
            f"{', '.join(f'{v:.2f}' for v in values)} | "
            f"{', '.join(f'{move:+.2f}' for move in moves)} | {mean_std(paired)} |"
        )
    lines += ["", "## Claims", "", *claims(teachers, students), "", "## What the students copy", "", *copied(args)]
    lines += ["", "## Agreement", "", *agreement(args)]
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    summary = {key: {"teacher": teachers[key]["final"], "students": [run["final"] for run in students[key]]}
               for key in teachers}  # fmt: skip
    Path(args.output).with_suffix(".json").write_text(
        json.dumps({"argv": argv, "commit": commit(), **summary}, indent=1)
    )
    print(text)
    return 0


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two lists of the same length (no ties expected)."""

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=values.__getitem__)
        return [order.index(i) for i in range(len(values))]

    n, ra, rb = len(a), ranks(a), ranks(b)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1)) if n > 1 else 0.0


def claims(teachers: dict[str, dict], students: dict[str, list[dict]]) -> list[str]:
    def teacher_acc(key: str) -> float:
        return teachers[key]["final"]["acc1"]

    def student_acc(key: str) -> float:
        return statistics.mean(run["final"]["avg_logits_acc1"] for run in students[key])

    cnns = sorted((spec.key for spec in TEACHERS if spec.kind == "CNN"), key=teacher_acc)
    order = ", ".join(f"{student_acc(key):.2f}" for key in cnns)
    monotone = all(student_acc(a) <= student_acc(b) for a, b in zip(cnns, cnns[1:], strict=False))
    lines = [
        f"- A stronger CNN teacher gives a better student, at every step: **{'yes' if monotone else 'no'}** "
        f"(students, in order of their teacher's accuracy: {order}; Spearman's rank correlation "
        f"{spearman([teacher_acc(key) for key in cnns], [student_acc(key) for key in cnns]):+.2f})"
    ]
    for spec in (spec for spec in TEACHERS if spec.kind == "transformer"):
        twin = min(cnns, key=lambda key: abs(teacher_acc(key) - teacher_acc(spec.key)))
        gap = abs(teacher_acc(twin) - teacher_acc(spec.key))
        if gap > EQUAL_ACCURACY:
            lines.append(
                f"- CNN against transformer at equal accuracy: **not judged**: the closest CNN teacher ({twin}, "
                f"{teacher_acc(twin):.2f}) is {gap:.2f} points from {spec.key} ({teacher_acc(spec.key):.2f})"
            )
            continue
        better = student_acc(twin) > student_acc(spec.key)
        lines.append(
            f"- Of two teachers of equal accuracy ({twin} {teacher_acc(twin):.2f}, {spec.key} "
            f"{teacher_acc(spec.key):.2f}), the CNN teaches better: **{'yes' if better else 'no'}** (students "
            f"{student_acc(twin):.2f} vs {student_acc(spec.key):.2f})"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
