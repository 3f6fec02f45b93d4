"""The paper's distillation table (Table 5 rows) on Fashion-MNIST, in a data-limited regime where students converge.

One CNN teacher is trained once per teacher seed on all 60,000 images and kept under --teacher-dir (the demo
and the teacher study reuse it); every student learns from teacher seed 0. The students train on a seeded,
class-balanced subset for many epochs, the regime the paper's claim is about: a transformer trained on little
data lacks a convnet's inductive bias, and the teacher's labels pass it on. Each student row runs with
--seeds seeds (mean ± std of the final test top-1); one distilled run gives four rows (class head,
distillation head, and the two fusions).

    python benchmarks/distillation_table.py                      # the committed table
    python benchmarks/distillation_table.py --epochs 2 --train-subset 512 --seeds 2 --teacher-seeds 1 \\
        --teacher-epochs 1 --teacher-subset 512 --views 2 --work-dir /tmp/t --teacher-dir /tmp/t/teachers \\
        --output /tmp/t/table.md                                     # smoke test, a few minutes

Runs are resumed when present and finished ones are not retrained, so an interrupted table continues; the
table is rewritten after every run, with the rows still missing marked as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from deit.analysis import figures
from deit.benchmark import matmul_peak_gflops
from deit.config import load_config, with_overrides
from deit.training import fit

STUDENT = "deit_nano_patch7_28"  # DeiT rows without a distillation token
DISTILLED_STUDENT = "deit_nano_distilled_patch7_28"  # DeiT⚗ rows: class + distillation tokens
TEACHER_PRESET = "fashion_mnist_teacher_strong"
STUDENT_PRESET = "fashion_mnist"
CONVERGED_WITHIN = 0.3  # points of val top-1 the undistilled student may still move over its last 20 % of epochs


@dataclass(frozen=True)
class Run:
    key: str
    overrides: dict = field(default_factory=dict)
    teacher_needed: bool = True


@dataclass(frozen=True)
class Row:
    method: str
    teacher: str  # the teacher's supervision, as in the paper's table
    run: str  # key of the Run that produced it ("teacher" for the teacher's own runs)
    metric: str  # which validation metric of that run


RUNS = (  # in the order they train: the two rows that decide whether a budget shows the effect come first
    Run("none", {"model.name": STUDENT, "distill.type": "none"}, teacher_needed=False),
    Run("token", {"model.name": DISTILLED_STUDENT, "distill.type": "hard", "distill.alpha": 0.5}),
    Run("soft_paper", {"model.name": STUDENT, "distill.type": "soft", "distill.tau": 3.0, "distill.alpha": 0.1}),
    Run(
        "soft_official",
        {
            "model.name": STUDENT,
            "distill.type": "soft",
            "distill.tau": 1.0,
            "distill.alpha": 0.5,
            "distill.kl_reduction": "official",
        },
    ),
    Run("hard", {"model.name": STUDENT, "distill.type": "hard", "distill.alpha": 0.5}),
)
ROWS = (
    Row("Teacher (CNN)", "n/a", "teacher", "acc1"),
    Row("DeiT, no distillation", "none", "none", "acc1"),
    Row("DeiT, soft distillation, paper: τ 3, λ 0.1, KL sum / batch", "soft", "soft_paper", "acc1"),
    Row(
        "DeiT, soft distillation, official code: τ 1, α 0.5, KL sum / (batch × classes)",
        "soft",
        "soft_official",
        "acc1",
    ),
    Row("DeiT, hard distillation (no distillation token)", "hard", "hard", "acc1"),
    Row("DeiT⚗: class head", "hard", "token", "cls_acc1"),
    Row("DeiT⚗: distillation head", "hard", "token", "dist_acc1"),
    Row("DeiT⚗: class + distillation (avg logits)", "hard", "token", "avg_logits_acc1"),
    Row("DeiT⚗: class + distillation (softmax sum)", "hard", "token", "softmax_sum_acc1"),
)


def add_student_budget(parser: argparse.ArgumentParser) -> None:
    """The students' data, epochs and augmentation: the table's regime, shared with the teacher study."""
    parser.add_argument("--train-subset", type=int, default=5000, help="class-balanced training images (0: all)")
    parser.add_argument("--epochs", type=int, default=50, help="epochs of every student")
    parser.add_argument(
        "--views", type=int, default=10, help="fixed augmented views per image, for every row (the teacher cache's)"
    )
    parser.add_argument("--rand-augment", default=None, help="RandAugment policy of the students (whole-batch)")
    parser.add_argument("--random-erasing", type=float, default=0.0, help="Random Erasing probability of the students")
    parser.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha of the students (needs --views 0)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha of the students (needs --views 0)")
    parser.add_argument("--eval-interval", type=int, default=2, help="evaluate students every N epochs")
    # a few thousand images make few steps per epoch (16 at 2,000 and batch 128): the preset's lr and warm-up
    # were set for 60,000 images, so the regime may need its own, chosen by a pilot of the undistilled row
    parser.add_argument("--lr", type=float, default=None, help="students' peak lr at batch 512 (default: preset's)")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="students' warm-up (default: preset's)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_student_budget(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per student row")
    parser.add_argument("--teacher-seeds", type=int, default=2, help="teachers trained for the teacher row")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the teacher preset's")
    parser.add_argument("--teacher-subset", type=int, default=0, help="teacher training images (0: all)")
    parser.add_argument("--teacher-dir", default=f"runs/teachers/{TEACHER_PRESET}")
    parser.add_argument("--work-dir", default="runs/distillation_table")
    parser.add_argument("--runs", nargs="+", default=[run.key for run in RUNS], help="student runs to train")
    parser.add_argument("--output", default="benchmarks/results/distillation_table.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


CHECKOUT = Path(__file__).resolve().parent  # in the git checkout whose commit each run records

# settings a finished run may differ in from the one asked for: how it was watched and where, not what it computed
UNCOMPARED = {"run.output_dir", "run.resume", "run.progress", "run.log_interval", "run.tensorboard", "data.num_workers"}


def saved_settings(folder: Path) -> dict | None:
    """The settings the run in ``folder`` wrote (its config.yaml), as nested dicts; None if it wrote none."""
    saved = folder / "config.yaml"
    return (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else None


def settings_differing(config, folder: Path) -> list[str]:
    """The settings the run in ``folder`` (its config.yaml) was trained with that differ from ``config``'s."""
    had = saved_settings(folder)
    if config is None or had is None:
        return []
    asked = _flat(json.loads(json.dumps(dataclasses.asdict(config))))  # tuples as lists, as YAML has them
    had = _flat(had)
    return [f"{key} = {had[key]!r} there, {asked[key]!r} asked" for key in sorted(asked.keys() & had.keys())
            if key not in UNCOMPARED and had[key] != asked[key]]  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1.0}} -> {"optim.lr": 1.0}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train_or_read(config, folder: Path) -> dict | None:
    """Train (or finish) the run in ``folder`` and return its wall minutes and metrics per epoch.

    A run found there with other settings than ``config``'s is still used (the committed tables hold runs
    made before a default changed, such as the attention kernel), but not silently: the differences are
    logged and returned under "settings_differing".
    """
    differing = settings_differing(config, folder)
    if differing:
        logging.warning("%s was trained with other settings than asked: %s", folder, "; ".join(differing))
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if {"minutes", "final", "history"} <= set(summary):  # ours, not the one `deit train` writes
            settings = saved_settings(folder)
            if "config" not in summary and settings is not None:  # finished before summaries kept it
                summary = {**summary, "config": settings}
            return {**summary, "settings_differing": differing} if differing else summary
    metrics = folder / "metrics.jsonl"
    # a run that resumes times only what is left of it: say where it resumed, so a table need not count it as whole
    done_before = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    speed = machine_speed()
    started = time.perf_counter()
    result = fit(config)
    # the settings travel with the summary into a table's JSON, so a run restored from it can still be compared
    summary = {"minutes": (time.perf_counter() - started) / 60, "final": result.final, "history": result.history,
               "resumed_from_epoch": done_before, "commit": commit(), "matmul_gflops": speed,
               "config": saved_settings(folder)}  # fmt: skip
    summary_file.write_text(json.dumps(summary))
    return summary


def machine_speed() -> dict[str, int]:
    """The machine's fp32 and bf16 matmul GFLOP/s, measured just before a run (a few seconds). Machines of the
    project's kind differ (136 to 327 fp32 seen), so a run's minutes are read beside this."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {dtype: round(matmul_peak_gflops(dtype, device)) for dtype in ("fp32", "bf16")}


def machines(summaries: list[dict]) -> str:
    """The fp32 / bf16 matmul GFLOP/s of the machines the runs trained on; "not measured" for older runs."""
    speeds = [f"{summary['matmul_gflops']['fp32']} / {summary['matmul_gflops']['bf16']}"
              if "matmul_gflops" in summary else "not measured" for summary in summaries]  # fmt: skip
    return ", ".join(dict.fromkeys(speeds))


def whole_run_minutes(summaries: list[dict]) -> list[float]:
    """Wall minutes of the runs that ran whole in one invocation; a resumed run timed only its rest."""
    return [summary["minutes"] for summary in summaries if not summary.get("resumed_from_epoch")]


def whole_minutes(summaries: list[dict]) -> str:
    """Mean wall minutes of the runs that ran whole in one invocation, and how many resumed runs are left out."""
    whole = whole_run_minutes(summaries)
    resumed = len(summaries) - len(whole)
    note = f" ({resumed} resumed run(s) not counted)" if resumed else ""
    return (f"{statistics.mean(whole):.1f}" if whole else "n/a") + note


def teacher_config(args: argparse.Namespace, seed: int):
    overrides = {"run.seed": seed, "run.output_dir": str(Path(args.teacher_dir) / f"seed{seed}"), "run.resume": "auto"}
    if args.teacher_epochs:
        overrides["optim.epochs"] = args.teacher_epochs
    if args.teacher_subset:
        overrides["data.train_subset"] = args.teacher_subset
    return with_overrides(load_config(TEACHER_PRESET), {**overrides, "run.progress": not args.no_progress})


def student_config(args: argparse.Namespace, run: Run, seed: int, teacher: Path):
    return with_overrides(
        load_config(STUDENT_PRESET),
        {
            **run.overrides,
            "optim.epochs": args.epochs,
            **({"optim.lr": args.lr} if args.lr else {}),
            **({"optim.warmup_epochs": args.warmup_epochs} if args.warmup_epochs is not None else {}),
            "data.train_subset": args.train_subset or None,
            "distill.teacher_path": str(teacher) if run.teacher_needed else None,
            # every row, the undistilled one too, cycles through the same fixed views of each image, so the
            # teacher's logits are computed once per view and no row sees more distinct images than another
            "distill.teacher_cache_views": args.views or None,
            "augment.rand_augment": args.rand_augment,
            "augment.random_erasing": args.random_erasing,
            "augment.mixup": args.mixup,
            "augment.cutmix": args.cutmix,
            "run.eval_teacher": False,
            "run.eval_interval": args.eval_interval,
            "run.seed": seed,
            "run.output_dir": str(Path(args.work_dir) / run.key / f"seed{seed}"),
            "run.resume": "auto",
            "run.progress": not args.no_progress,
        },
    )


def _last_fifth(history: list[dict]) -> list[dict]:
    """The evaluated epochs of the last 20 % of training."""
    evaluated = [record for record in history if "val" in record]
    last_epoch = evaluated[-1]["epoch"]
    return [record for record in evaluated if record["epoch"] >= 0.8 * last_epoch]


def late_movement(history: list[dict], metric: str = "acc1") -> float:
    """How far val top-1 moved over the last 20 % of epochs: last value minus the first evaluated in that span."""
    span = _last_fifth(history)
    return span[-1]["val"][metric] - span[0]["val"][metric]


def fitted_late_movement(history: list[dict], metric: str = "acc1") -> float | None:
    """The same movement read off a least-squares line through every evaluation of the last 20 %.

    Two single evaluations differ by their noise (about 0.2-0.5 points here); the line uses all of the span's
    evaluations, so a curve still rising reads as rising and a flat but noisy one as flat.
    """
    span = _last_fifth(history)
    if len(span) < 3:
        return None
    epochs = [record["epoch"] for record in span]
    fit = statistics.linear_regression(epochs, [record["val"][metric] for record in span])
    return fit.slope * (epochs[-1] - epochs[0])


def _movement(history: list[dict], metric: str = "acc1") -> str:
    """Both late-movement measures, as the table prints them: endpoints, then the fitted line in brackets."""
    fitted = fitted_late_movement(history, metric)
    return f"{late_movement(history, metric):+.2f}" + (f" ({fitted:+.2f})" if fitted is not None else "")


def mean_std(values: list[float]) -> str:
    if not values:
        return "not run yet"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def commit() -> str:
    """The commit of the checkout these scripts are in (wherever they are run from), or "unknown"."""
    git = ["git", "-C", str(CHECKOUT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # the tables this script rewrites as it goes are not code: only other changes make the commit "dirty"
    changed = [line for line in dirty.stdout.splitlines() if not line[3:].startswith("benchmarks/results/")]
    return head.stdout.strip() + (" with uncommitted changes" if changed else "")


def paired_differences(values: dict[str, list[float]]) -> list[str]:
    """Each row against no distillation, seed by seed: a seed picks the training subset, the same for every row.

    The rows' own spreads hold how much the subset moves every student alike; the paired differences do not.
    """
    baseline = values.get("none", [])
    lines = ["", "## Against no distillation, seed by seed", "",
             "Each seed draws its own training subset, the same for every row of that seed, so the rows move together "
             "from seed to seed; the difference on the same images is the effect.", "",
             "| row | difference per seed (points) | mean ± std |", "|---|---|---:|"]  # fmt: skip
    for key in ("soft_paper", "soft_official", "hard", "token"):
        pairs = list(zip(values.get(key, []), baseline, strict=False))
        if not pairs:
            continue
        differences = [row - none for row, none in pairs]
        lines.append(f"| {key} | {', '.join(f'{d:+.2f}' for d in differences)} | {mean_std(differences)} |")
    return lines if baseline else []


def goals(values: dict[str, list[float]], teachers: list[float]) -> list[str]:
    """Each goal of the issue, judged on the runs that exist; a goal whose rows are missing says so."""

    def judged(name: str, needed: list[str], test) -> str:
        if any(len(values.get(key, [])) < 2 for key in needed):
            return f"- {name}: not judged yet (fewer than 2 seeds of {', '.join(needed)})"
        met, detail = test()
        return f"- {name}: **{'met' if met else 'not met'}** ({detail})"

    def mean(key: str) -> float:
        return statistics.mean(values[key])

    def gap() -> tuple[bool, str]:
        difference = mean("token") - mean("none")
        pooled = ((statistics.variance(values["token"]) + statistics.variance(values["none"])) / 2) ** 0.5
        return difference >= 1.5 and difference > 2 * pooled, f"{difference:+.2f} points, pooled std {pooled:.2f}"

    lines = []
    if teachers:
        lines.append(
            f"- Teacher ≥ 94.0 %: **{'met' if statistics.mean(teachers) >= 94.0 else 'not met'}** "
            f"({mean_std(teachers)})"
        )
    lines.append(
        judged("Class + distillation ≥ no distillation + 1.5 points, gap > 2 pooled std", ["token", "none"], gap)
    )
    for soft in ("soft_paper", "soft_official"):
        lines.append(
            judged(
                f"Hard ≥ soft ({soft})",
                ["hard", soft],
                lambda soft=soft: (mean("hard") >= mean(soft), f"{mean('hard'):.2f} vs {mean(soft):.2f}"),
            )
        )
    lines.append(
        judged(
            "Class + distillation ≥ hard distillation without a distillation token",
            ["token", "hard"],
            lambda: (mean("token") >= mean("hard"), f"{mean('token'):.2f} vs {mean('hard'):.2f}"),
        )
    )
    return lines


def write_table(
    args, argv, summaries: dict[str, list[dict]], teachers: list[dict], started: float, measured_at: str
) -> str:
    output = Path(args.output)
    curves = output.parent / f"{output.stem}_curves"
    curves.mkdir(parents=True, exist_ok=True)
    subset = f"{args.train_subset} class-balanced training images" if args.train_subset else "all 60000 images"
    student_values = {key: [s["final"]["avg_logits_acc1" if key == "token" else "acc1"] for s in runs]
                      for key, runs in summaries.items()}  # fmt: skip
    teacher_values = [t["final"]["acc1"] for t in teachers]
    student_optim = student_config(args, RUNS[0], 0, Path()).optim
    lines = [
        "# The distillation table on Fashion-MNIST",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/distillation_table.py', *argv])}`",
        "",
        f"Students: {subset}, {args.epochs} epochs (`{STUDENT_PRESET}` preset; `{STUDENT}` without and "
        f"`{DISTILLED_STUDENT}` with the distillation token), evaluated on the 10000 test images; "
        f"mean ± std of the final top-1 (%) over seeds 0–{args.seeds - 1}. Teacher: `{TEACHER_PRESET}` on all 60000 "
        f"images, seeds 0–{args.teacher_seeds - 1}; every student learns from teacher seed 0. "
        + (
            f"Every student row cycles through the same {args.views} fixed augmented views of each image (the "
            "teacher cache's)"
            if args.views
            else "Every student sees a new augmentation of each image every epoch, the teacher online"
        )
        + f"; crop and flip, RandAugment {args.rand_augment or 'off'}, Random Erasing {args.random_erasing}, "
        f"Mixup {args.mixup}, CutMix {args.cutmix}; "
        f"peak lr {student_optim.lr:g} at batch 512 after {student_optim.warmup_epochs:g} warm-up epoch(s); "
        f"evaluated every {args.eval_interval} epochs.",
        f"Measured at commit {measured_at} on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; this invocation took {(time.perf_counter() - started) / 60:.0f} min "
        "(finished runs are read, not retrained).",
        "",
        "| method | teacher | top-1 (%) | per seed | last 20 % of epochs moved (fitted line) | minutes per run "
        "| curves |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for row in ROWS:
        runs = teachers if row.run == "teacher" else summaries.get(row.run, [])
        values = [run["final"][row.metric] for run in runs]
        movement = [_movement(run["history"], row.metric) for run in runs]
        curve = ""
        if runs:
            name = f"{row.run}.png"
            records = {f"seed{index}": run["history"] for index, run in enumerate(runs)}
            figures.save(figures.curves_figure(records), curves / name)
            curve = f"[{name}]({curves.name}/{name})"
        lines.append(
            f"| {row.method} | {row.teacher} | {mean_std(values)} | {', '.join(f'{v:.2f}' for v in values)} | "
            f"{', '.join(movement)} | "
            f"{whole_minutes(runs) if runs else 'n/a'} | {curve} |"
        )
    lines += paired_differences(student_values)
    lines += ["", "## Goals", "", *goals(student_values, teacher_values)]
    none_runs = summaries.get("none", [])
    if none_runs:
        moves = [late_movement(run["history"]) for run in none_runs]
        fitted = [fitted_late_movement(run["history"]) for run in none_runs]
        converged = all(abs(move) < CONVERGED_WITHIN for move in moves + [f for f in fitted if f is not None])
        lines.append(
            f"- The undistilled student has converged (val top-1 moves < {CONVERGED_WITHIN} points over the last "
            f"20 % of epochs, by both measures): **{'yes' if converged else 'no'}** "
            f"({', '.join(_movement(run['history']) for run in none_runs)})"
        )
    notes = output.with_name(f"{output.stem}_notes.md")
    if notes.is_file():  # written by hand, from the runs: what the figures say and what is not met
        lines += ["", f"What these figures say, and what the goals not met would need: [{notes.name}]({notes.name})."]
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    output.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": ["python", "benchmarks/distillation_table.py", *argv],
                "commit": measured_at,
                "teachers": [{"final": t["final"], "minutes": t["minutes"]} for t in teachers],
                "students": {
                    k: [{"final": s["final"], "minutes": s["minutes"]} for s in v] for k, v in summaries.items()
                },
            },
            indent=1,
        )
    )
    return text


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    measured_at = commit()  # read once: commits made while the table trains do not change the code it runs
    teachers: list[dict] = []
    summaries: dict[str, list[dict]] = {}
    for seed in range(args.teacher_seeds if args.teacher_seeds else 1):
        logging.info("teacher seed %d", seed)
        config = teacher_config(args, seed)
        teachers.append(train_or_read(config, Path(config.run.output_dir)))
        write_table(args, argv, summaries, teachers, started, measured_at)
        if seed == 0:  # the students need only teacher seed 0: train them before the other teachers
            teacher = Path(config.run.output_dir) / "checkpoint.pth"
            for student_seed in range(args.seeds):
                for run in RUNS:
                    if run.key not in args.runs:
                        continue
                    logging.info("student seed %d: %s", student_seed, run.key)
                    config_s = student_config(args, run, student_seed, teacher)
                    summaries.setdefault(run.key, []).append(train_or_read(config_s, Path(config_s.run.output_dir)))
                    write_table(args, argv, summaries, teachers, started, measured_at)
    print(write_table(args, argv, summaries, teachers, started, measured_at))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
