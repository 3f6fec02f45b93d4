"""Label efficiency on Fashion-MNIST: how much of the labels' worth unlabelled images and a teacher give back.

For each label fraction (1 %, 10 %, 100 % of the 60,000 training labels, a stratified seeded
split) and each seed, on the same budget (every run has as many steps as E epochs of all 60,000
images; labelled images are cycled when there are fewer):

* teacher       a ResNet-18 trained on the labelled images only (``fashion_mnist_teacher``)
* supervised    the DeiT student on the labelled images only (``fashion_mnist``, no teacher)
* semi-sup.     the student with the rest as unlabelled images: labels train its class head,
                the teacher above trains its distillation head on every image (soft, tau 1)
* Noisy Student generations 1 and 2: generation 0 is the supervised student; each generation
                pseudo-labels the whole pool with the previous one on clean images and trains a
                noised student (dropout and stochastic depth 0.1) of the same size on them

    python benchmarks/label_efficiency.py                       # the committed table
    python benchmarks/label_efficiency.py --epochs 1 --train-subset 2000 --seeds 1 --output /tmp/l.md  # smoke

Runs live under --work-dir and are resumed when present: an interrupted table picks up where it
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
from pathlib import Path

import torch

from deit.config import TrainConfig, load_config, with_overrides
from deit.noisy_student import NoisyStudentPlan, run_noisy_student
from deit.training import fit

NOISE = {"model.dropout": 0.1, "model.drop_path": 0.1}  # the Noisy Student's model noise
METHODS = ("teacher", "supervised", "semi-supervised distillation", "Noisy Student gen 1", "Noisy Student gen 2")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (of the whole pool)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--unlabeled-ratio", type=float, default=0.75, help="unlabelled share of each batch")
    parser.add_argument("--train-subset", type=int, default=0, help="class-balanced training pool (0: all 60000)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("supervised", "semi", "noisy-student"),
        default=["supervised", "semi", "noisy-student"],
        help="the students to train (the teacher when one needs it)",
    )
    parser.add_argument("--work-dir", default="runs/label_efficiency")
    parser.add_argument("--output", default="benchmarks/results/label_efficiency.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_fraction(args: argparse.Namespace, fraction: float, seed: int, work: Path) -> dict[str, tuple[float, float]]:
    """Every method at one label fraction and seed: {method: (top-1 %, minutes)}."""
    common = {
        "data.train_subset": args.train_subset or None,
        "data.label_fraction": fraction if fraction < 1 else None,
        "data.unlabeled_ratio": args.unlabeled_ratio,
        "run.seed": seed,
        "run.resume": "auto",
        "run.progress": not args.no_progress,
        "run.eval_teacher": False,
    }

    def config(preset: str, folder: str, **overrides) -> TrainConfig:
        values = {**common, "optim.epochs": args.epochs, "run.output_dir": str(work / folder), **overrides}
        return with_overrides(load_config(preset), values)

    noisy_student = "noisy-student" in args.methods and fraction < 1  # it needs unlabelled images
    runs = {
        "teacher": (
            "semi" in args.methods,
            config("fashion_mnist_teacher", "teacher", **{"optim.epochs": args.teacher_epochs}),
        ),
        "supervised": ("supervised" in args.methods or noisy_student, config("fashion_mnist", "supervised")),
        "semi-supervised distillation": (
            "semi" in args.methods,
            config(
                "fashion_mnist",
                "semi",
                **{"distill.type": "soft", "distill.teacher_path": str(work / "teacher" / "checkpoint.pth")},
            ),
        ),
    }
    results: dict[str, tuple[float, float]] = {}
    for method, (wanted, run_config) in runs.items():
        if not wanted:
            continue
        logging.info("fraction %s seed %d: %s", fraction, seed, method)
        result = fit(run_config)
        results[method] = (result.final["acc1"], result.seconds / 60)
    if noisy_student:  # generation 0 is the supervised student
        plan = NoisyStudentPlan(generations=2, teacher_path=str(work / "supervised" / "checkpoint.pth"))
        noised = config("fashion_mnist", "noisy_student", **{"distill.type": "soft", **NOISE})
        for record in run_noisy_student(noised, plan, work / "noisy_student"):
            results[f"Noisy Student gen {record['generation']}"] = (record["acc1"], record["seconds"] / 60)
            results[f"pseudo-label accuracy gen {record['generation']}"] = (
                record["pseudo_labels"].get("unlabeled_accuracy", float("nan")),
                0.0,
            )
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    work = Path(args.work_dir)
    table: dict[float, dict[str, list[tuple[float, float]]]] = {}
    for seed in range(args.seeds):
        for fraction in args.fractions:
            results = run_fraction(args, fraction, seed, work / f"labels{fraction:g}" / f"seed{seed}")
            for method, value in results.items():
                table.setdefault(fraction, {}).setdefault(method, []).append(value)
    command = "python benchmarks/label_efficiency.py " + shlex.join(argv)
    pool = f"a class-balanced pool of {args.train_subset}" if args.train_subset else "all 60000 training images"
    lines = [
        "# Label efficiency on Fashion-MNIST",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Pool: {pool}, of which the given fraction keeps its labels (stratified, seeded); validation: the",
        f"10000 test images. Students `deit_nano_distilled_patch7_28` for {args.epochs} epochs of the pool, teacher",
        f"ResNet-18 for {args.teacher_epochs}; unlabelled share of a batch {args.unlabeled_ratio}. {args.seeds} seeds,",
        f"mean ± std of the final top-1 (%). Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch",
        f"{torch.__version__}; the table took {(time.perf_counter() - started) / 60:.0f} min (finished runs reused).",
        "",
        "| labels | " + " | ".join(METHODS) + " |",
        "|---|" + "---:|" * len(METHODS),
    ]
    for fraction, methods in table.items():
        cells = [mean_std([acc for acc, _ in methods.get(method, [])]) for method in METHODS]
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Minutes per run (mean over seeds):", "", "| labels | " + " | ".join(METHODS) + " |"]
    lines.append("|---|" + "---:|" * len(METHODS))
    for fraction, methods in table.items():
        cells = [
            f"{statistics.mean(m for _, m in methods[method]):.1f}" if method in methods else "n/a"
            for method in METHODS
        ]
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    pseudo_label_lines = [
        f"- {fraction:.0%} labels, generation {generation}: {mean_std(values)}"
        for fraction, methods in table.items()
        for generation in (1, 2)
        if (values := [acc for acc, _ in methods.get(f"pseudo-label accuracy gen {generation}", [])])
    ]
    if pseudo_label_lines:
        lines += ["", "Pseudo-label accuracy on the unlabelled images (against their hidden labels):", ""]
        lines += pseudo_label_lines
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps({"command": command, "table": table}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
