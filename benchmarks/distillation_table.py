"""The paper's distillation table (Table 5 rows), measured on Fashion-MNIST on this machine.

Every row trains under the same budget (epochs, training images, batch); each row is run with
several seeds and reported as mean ± std of the validation top-1. The teacher is trained once
per seed and teaches the students of that seed. One distilled run gives three rows of the table:
its class head, its distillation head and their fusion.

    python benchmarks/distillation_table.py                      # the committed table (about 40 minutes here)
    python benchmarks/distillation_table.py --epochs 1 --train-subset 512 --seeds 1 --output /tmp/t.md   # smoke

Runs live under --work-dir and are resumed when present, so an interrupted table picks up where it
stopped and a finished one is only re-tabulated.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deit.config import load_config, with_overrides
from deit.training import fit

STUDENT = "deit_nano_patch7_28"  # DeiT- rows: no distillation token
DISTILLED_STUDENT = "deit_nano_distilled_patch7_28"  # DeiT-alembic rows: class + distillation tokens


@dataclass(frozen=True)
class Run:
    key: str
    overrides: dict = field(default_factory=dict)
    teacher_needed: bool = False


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    teacher: str
    run: str  # key of the Run that produced it
    metric: str  # which validation metric of that run


RUNS = (
    Run("none", {"model.name": STUDENT, "distill.type": "none"}),
    Run("soft_paper", {"model.name": STUDENT, "distill.type": "soft", "distill.tau": 3.0, "distill.alpha": 0.1}, True),
    Run(
        "soft_official",
        {
            "model.name": STUDENT,
            "distill.type": "soft",
            "distill.tau": 1.0,
            "distill.alpha": 0.5,
            "distill.kl_reduction": "official",
        },
        True,
    ),
    Run("hard", {"model.name": STUDENT, "distill.type": "hard", "distill.alpha": 0.5}, True),
    Run("token", {"model.name": DISTILLED_STUDENT, "distill.type": "hard", "distill.alpha": 0.5}, True),
)
ROWS = (
    Row("Teacher: ResNet-18 (CNN)", "yes", "n/a", "teacher", "acc1"),
    Row("DeiT-, no distillation", "yes", "none", "none", "acc1"),
    Row("DeiT-, usual distillation (paper: tau 3, lambda 0.1)", "yes", "soft", "soft_paper", "acc1"),
    Row(
        "DeiT-, usual distillation (official code: tau 1, alpha 0.5, sum/(B*C))", "yes", "soft", "soft_official", "acc1"
    ),
    Row("DeiT-, hard distillation", "yes", "hard", "hard", "acc1"),
    Row("DeiT-alembic: class embedding", "yes", "hard", "token", "cls_acc1"),
    Row("DeiT-alembic: distillation embedding", "yes", "hard", "token", "dist_acc1"),
    Row("DeiT-alembic: class + distillation (avg logits)", "yes", "hard", "token", "avg_logits_acc1"),
    Row("DeiT-alembic: class + distillation (softmax sum)", "yes", "hard", "token", "softmax_sum_acc1"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every run, teacher included")
    parser.add_argument("--train-subset", type=int, default=10000, help="class-balanced training images (0: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work-dir", default="runs/distillation_table")
    parser.add_argument("--output", default="benchmarks/results/distillation_table.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    common = {
        "optim.epochs": args.epochs,
        "data.train_subset": args.train_subset or None,
        "run.resume": "auto",
        "run.progress": not args.no_progress,
        "run.eval_teacher": False,
    }
    work = Path(args.work_dir)
    metrics: dict[str, list[dict]] = {}
    minutes: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        teacher_dir = work / "teacher" / f"seed{seed}"
        plan = [("teacher", load_config("fashion_mnist_teacher"), {}, teacher_dir)]
        plan += [
            (
                run.key,
                load_config("fashion_mnist"),
                {
                    **run.overrides,
                    "distill.teacher_path": str(teacher_dir / "checkpoint.pth") if run.teacher_needed else None,
                },
                work / run.key / f"seed{seed}",
            )
            for run in RUNS
        ]
        for key, preset, overrides, folder in plan:
            config = with_overrides(preset, {**common, **overrides, "run.seed": seed, "run.output_dir": str(folder)})
            logging.info("seed %d: %s", seed, key)
            result = fit(config)
            metrics.setdefault(key, []).append(result.final)
            minutes.setdefault(key, []).append(sum(r["seconds"] for r in result.history) / 60)

    command = "python benchmarks/distillation_table.py " + shlex.join(argv)
    subset = f"{args.train_subset} class-balanced training images" if args.train_subset else "all 60000 training images"
    lines = [
        "# The distillation table on Fashion-MNIST",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Fashion-MNIST, {subset}, the 10000 test images for validation; every run {args.epochs} epochs;",
        f"{args.seeds} seeds (mean ± std of the final top-1, %). Teacher: timm ResNet-18 (`fashion_mnist_teacher`),",
        f"students: `{STUDENT}` / `{DISTILLED_STUDENT}` (`fashion_mnist` preset), the teacher of the same seed.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__};",
        f"the whole table took {(time.perf_counter() - started) / 60:.0f} min (finished runs are not retrained).",
        "",
        "| method | label | teacher | top-1 (%) | per seed | minutes per run |",
        "|---|---|---|---:|---|---:|",
    ]
    for row in ROWS:
        values = [m[row.metric] for m in metrics[row.run]]
        per_seed = ", ".join(f"{v:.2f}" for v in values)
        lines.append(
            f"| {row.method} | {row.label} | {row.teacher} | {mean_std(values)} | {per_seed} | "
            f"{statistics.mean(minutes[row.run]):.1f} |"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(
        json.dumps({"command": command, "metrics": metrics, "minutes": minutes}, indent=1)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
