"""``deit pseudo-label`` and ``deit noisy-student``: learning from unlabelled images (see deit.noisy_student)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deit.cli.train import add_config_arguments, train_config_from_args
from deit.run import RunError


def _add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=float, default=0.0, help="drop unlabelled images less sure than this (top probability)"
    )
    parser.add_argument(
        "--balance", action="store_true", help="the same number of unlabelled images per pseudo-class, as the paper"
    )


def add_pseudo_label_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pseudo-label",
        help="store a teacher's predictions on a training pool, for deit train --pseudo-labels",
        description="Run --teacher-path on the clean images of the training pool that the same data flags "
        "(--label-fraction, --unlabeled-data-path, --seed) give deit train, and write --output.",
    )
    add_config_arguments(parser)
    _add_selection_arguments(parser)
    parser.add_argument("--output", required=True, help="the pseudo-label file to write (.safetensors)")
    parser.set_defaults(handler=run_pseudo_label)


def run_pseudo_label(args: argparse.Namespace) -> int:
    from deit.noisy_student import make_pseudo_labels

    config = train_config_from_args(args)
    if config.distill.teacher_path is None:
        raise RunError("deit pseudo-label needs --teacher-path")
    stats = make_pseudo_labels(
        config, config.distill.teacher_path, Path(args.output), threshold=args.threshold, balance=args.balance
    )
    print(json.dumps(stats))
    return 0


def add_noisy_student_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "noisy-student",
        help="k generations of teacher -> pseudo-labels -> noised student",
        description="Noisy Student training. The training flags configure every generation's student (its noise: "
        "--aa, --drop, --drop-path); --teacher-path is generation 0, or it is trained on the labelled images.",
    )
    add_config_arguments(parser)
    _add_selection_arguments(parser)
    parser.add_argument("--generations", type=int, default=2, help="students trained in turn (default 2)")
    parser.add_argument(
        "--students", nargs="+", help="the model of each generation, equal or larger (default: --model for all)"
    )
    parser.set_defaults(handler=run_noisy_student_command)


def run_noisy_student_command(args: argparse.Namespace) -> int:
    from deit.noisy_student import NoisyStudentPlan, run_noisy_student

    config = train_config_from_args(args)
    if config.run.output_dir is None:
        raise RunError("deit noisy-student needs --output-dir (one folder per generation goes there)")
    plan = NoisyStudentPlan(
        generations=args.generations,
        threshold=args.threshold,
        balance=args.balance,
        students=tuple(args.students or ()),
        teacher_path=config.distill.teacher_path,
    )
    records = run_noisy_student(config, plan, config.run.output_dir)
    for record in records:
        print(json.dumps({key: record[key] for key in ("generation", "model", "acc1", "checkpoint")}))
    return 0
