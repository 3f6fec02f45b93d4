"""Does bf16 autocast cost accuracy? The distillation table's runs trained in bf16 and in fp32, at equal epochs.

Issue 16 turns bf16 on by default where the hardware computes it natively; this is the check it asks for
first. Each run is the distillation table's (same preset, subset, epochs, augmentation, teacher) with
``run.amp`` set to ``bf16`` or ``none``; the teacher runs in the student's precision, as in `deit train`.
Same seed, same images, same augmentation draws: the paired difference is the precision's effect, plus the
chaos of two runs whose arithmetic differs from the first step on. Both arms use explicit attention and a
teacher in its own memory format, as the table's runs did, so only the precision differs.
Options not listed by --help (--epochs, --train-subset, ...) are the distillation table's.

    python benchmarks/precision_check.py --bf16-work-dir runs/distillation_table   # reuse the table's bf16 runs
    python benchmarks/precision_check.py --epochs 2 --train-subset 512 --seeds 1 --work-dir /tmp/p \\
        --output /tmp/p/check.md                                                      # smoke test

Finished runs are read, not retrained, so an interrupted check continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from distillation_table import RUNS, TEACHER_PRESET, commit, mean_std, student_config, train_or_read
from distillation_table import parse_args as table_args

from deit.config import with_overrides

PRECISIONS = {"bf16": "bf16", "fp32": "none"}  # name in the table -> run.amp
# the table's data-limited budget at 100 epochs (benchmarks/results/distillation_table.md)
TABLE_BUDGET = [
    "--train-subset", "2000", "--epochs", "100", "--views", "0", "--rand-augment", "rand-m9-mstd0.5-inc1",
    "--random-erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--eval-interval", "10",
]  # fmt: skip
METRIC = {"token": "avg_logits_acc1"}  # class + distillation for the distilled student, top-1 for the others


@dataclass(frozen=True)
class PairedVerdict:
    """bf16 − fp32 top-1 differences paired by seed, and whether bf16 is lower.

    The subset and augmentation each seed draws move both arms alike, so the differences' own spread is the
    noise. bf16 is lower only if even the mean + 2 standard errors stays below zero.
    """

    mean: float
    error: float  # standard error of the mean difference
    upper: float  # mean + 2 standard errors
    lower: bool

    @classmethod
    def of(cls, differences: list[float]) -> PairedVerdict | None:
        """None with fewer than 2 pairs: one difference has no spread to judge it by."""
        if len(differences) < 2:
            return None
        mean = statistics.mean(differences)
        error = statistics.stdev(differences) / len(differences) ** 0.5
        return cls(mean, error, mean + 2 * error, mean + 2 * error < 0)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's options, and the distillation table's (budget, --no-progress) parsed from the rest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["token"], choices=[run.key for run in RUNS])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--work-dir", default="runs/precision_check")
    parser.add_argument("--bf16-work-dir", default=None, help="read or train the bf16 runs here (default: work-dir)")
    parser.add_argument("--teacher-dir", default=f"runs/teachers/{TEACHER_PRESET}")
    parser.add_argument("--output", default="benchmarks/results/precision_check.md")
    own, rest = parser.parse_known_args(argv)
    budget = table_args([*TABLE_BUDGET, *rest, "--teacher-dir", own.teacher_dir])
    return own, budget


def run_folder(own: argparse.Namespace, precision: str) -> Path:
    if precision == "bf16" and own.bf16_work_dir:
        return Path(own.bf16_work_dir)
    return Path(own.work_dir) / precision


def train_all(own: argparse.Namespace, budget: argparse.Namespace) -> dict[tuple[str, str], list[dict]]:
    """(run, precision) -> the summaries of seeds 0..seeds-1, training what is missing."""
    teacher = Path(own.teacher_dir) / "seed0" / "checkpoint.pth"
    if not teacher.is_file():
        raise SystemExit(f"no teacher at {teacher}: run benchmarks/distillation_table.py first")
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in range(own.seeds):
        for run in (r for r in RUNS if r.key in own.runs):
            for precision, amp in PRECISIONS.items():
                config = student_config(budget, run, seed, teacher)
                folder = run_folder(own, precision) / run.key / f"seed{seed}"
                # as the table's runs: explicit attention, the teacher in its own memory format (the defaults then)
                overrides = {"run.amp": amp, "run.output_dir": str(folder), "model.attn_impl": "math",
                             "distill.teacher_channels_last": False}  # fmt: skip
                logging.info("seed %d: %s in %s", seed, run.key, precision)
                results.setdefault((run.key, precision), []).append(
                    train_or_read(with_overrides(config, overrides), folder)
                )
    return results


def write_report(own, budget, argv, results, measured_at: str, started: float) -> str:
    lines = [
        "# bf16 against fp32 at equal epochs",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/precision_check.py', *argv])}`",
        "",
        f"The distillation table's students: {budget.train_subset} class-balanced Fashion-MNIST images, "
        f"{budget.epochs} epochs, RandAugment {budget.rand_augment}, Random Erasing {budget.random_erasing}, "
        f"Mixup {budget.mixup}, CutMix {budget.cutmix}, the `{TEACHER_PRESET}` teacher online; final test top-1 "
        f"(%) on the 10000 test images, seeds 0–{own.seeds - 1}. The distilled student reports class + "
        "distillation (average of the two heads' logits).",
        f"Measured at commit {measured_at} with torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"this invocation took {(time.perf_counter() - started) / 60:.0f} min (finished runs are read).",
        "",
        "| run | precision | top-1 (%) | per seed | minutes per run |",
        "|---|---|---:|---|---:|",
    ]
    for (key, precision), runs in results.items():
        values = [run["final"][METRIC.get(key, "acc1")] for run in runs]
        minutes = statistics.mean(run["minutes"] for run in runs)
        lines.append(
            f"| {key} | {precision} | {mean_std(values)} | {', '.join(f'{v:.2f}' for v in values)} | {minutes:.1f} |"
        )
    lines += ["", "## bf16 − fp32, seed by seed", "",
              "| run | per seed (points) | mean ± std | standard error | bf16 speed-up (fp32 / bf16 time) |",
              "|---|---|---:|---:|---:|"]  # fmt: skip
    verdicts = []
    for key in own.runs:
        bf16, fp32 = results.get((key, "bf16"), []), results.get((key, "fp32"), [])
        pairs = list(zip(bf16, fp32, strict=False))
        if not pairs:
            continue
        metric = METRIC.get(key, "acc1")
        differences = [b["final"][metric] - f["final"][metric] for b, f in pairs]
        speedup = statistics.mean(f["minutes"] / b["minutes"] for b, f in pairs)
        verdict = PairedVerdict.of(differences)
        lines.append(f"| {key} | {', '.join(f'{d:+.2f}' for d in differences)} | {mean_std(differences)} | "
                     f"{'' if verdict is None else f'{verdict.error:.2f}'} | {speedup:.2f}× |")  # fmt: skip
        if verdict is not None:
            verdicts.append(
                f"- {key}: bf16 is {'**lower**' if verdict.lower else '**not lower**'} than fp32 (mean difference "
                f"{verdict.mean:+.2f}, + 2 standard errors {verdict.upper:+.2f}; lower means below 0)"
            )
    lines += ["", "## Verdict", "", *(verdicts or ["- not judged yet: fewer than 2 seeds of both precisions"])]
    text = "\n".join(lines) + "\n"
    output = Path(own.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": ["python", "benchmarks/precision_check.py", *argv],
                "commit": measured_at,
                "runs": {
                    f"{key}/{precision}": [{"final": r["final"], "minutes": r["minutes"]} for r in runs]
                    for (key, precision), runs in results.items()
                },
            },
            indent=1,
        )
    )
    return text


def main(argv: list[str]) -> int:
    own, budget = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started, measured_at = time.perf_counter(), commit()
    results = train_all(own, budget)
    print(write_report(own, budget, argv, results, measured_at, started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
