"""Self-supervised pretraining on Fashion-MNIST: what each method's features are worth, and what they give few labels.

Part 1, the representation. Each method pretrains on the 60,000 training
images without their labels. SimCLR, MoCo v2 and v3, BYOL, DeepCluster, CPC
and CMC pretrain the same CNN (``fashion_mnist_pretrain``: a small-image
ResNet-8). BEiT pretrains the student's ViT (``deit_nano_patch7_28``), with a
256-token tokenizer of 7 px patches fitted once (``deit tokenizer``: a k-means
codebook, or with ``--beit-target dvae`` a small discrete VAE; ``--beit-target
pixels`` predicts the masked pixels instead, SimMIM's baseline). Then
``deit linear-probe`` scores the frozen features: a logistic regression and a
kNN classifier, beside the same network at random init and the raw pixels.

Part 2, few labels (the label-efficiency table's question), for each label
fraction and seed:

* supervised            the DeiT student on the labelled images only
* the same for BEiT's total epochs (its pretraining's plus the student's): the fair
                        comparison for BEiT + fine-tune
* BEiT + fine-tune      the student started from BEiT (``deit train --init``); these two at 10 % and 100 %
* pretrain + fine-tune  the ``--simclrv2-method`` CNN fine-tuned on the labelled images
* SimCLRv2              that fine-tuned CNN distils into the DeiT student on all images,
                        labelled or not (``--label-fraction``, ``--distillation-type hard``)

and, as the mark to reach, the same at 100 % of the labels.

Part 3, each method fine-tuned: every CNN method's backbone ``--init`` into
the fine-tuning recipe at 10 % and 100 % of the labels, beside the same CNN
trained from scratch by that recipe. (BEiT's fine-tune is part 2's column,
since it pretrains the student itself. CMC's ``--init`` keeps its first
encoder, the one of the intensity view.)

    python benchmarks/self_supervised.py                        # the committed table
    python benchmarks/self_supervised.py --methods simclr --pretrain-epochs 1 --student-epochs 1 \\
        --finetune-epochs 1 --seeds 1 --fractions 0.1 --work-dir /tmp/ssl --output /tmp/ssl.md   # smoke

Runs live under --work-dir; finished runs (and their probes) are read, not redone, so an
interrupted table continues where it stopped. The table's JSON records every finished run with its
folder, and a new --work-dir (a fresh clone, a new machine) is first filled with those records, so the
table continues there too. A run downstream of a pretraining (a fine-tune, SimCLRv2's student) needs
the pretrained checkpoint, which is not committed: it trains only where that checkpoint is on disk, and
is read back where it already finished. ``--report-only`` trains nothing and writes the table of the
runs that are finished. After a fix that changes what runs compute, ``--retrain-before COMMIT`` trains
again the finished runs it visits that an older commit trained (the old run is kept beside its folder).
A finished run whose pretrained checkpoint or teacher was written after it finished (that
pretraining ran again) is stale, and trains again the same way (``--report-only`` leaves it out).
A pilot on other settings writes its own table (``--output``) from the same runs: ``--first-seed`` picks
its seeds, and students of another ``--student-epochs`` train in folders that name it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from distillation_table import CHECKOUT, commit, machines, mean_std, train_or_read, whole_minutes, whole_run_minutes

from deit.config import PRETRAIN_METHODS, load_config, with_overrides
from deit.data import build_probe_data
from deit.ssl.probe import probe_checkpoint
from deit.ssl.tokenizer import train_tokenizer

PRETRAIN_PRESET = "fashion_mnist_pretrain"
FINETUNE_PRESET = "fashion_mnist_teacher_strong"  # its recipe (schedule, RE, smoothing) for the pretrained CNN
STUDENT_PRESET = "fashion_mnist"
STUDENT_EPOCHS = 10  # the DeiT students' epochs of the pool in part 2, as label_efficiency.py
METHODS = PRETRAIN_METHODS
BEIT_MODEL = "deit_nano_patch7_28"  # the student's architecture, without the distillation token: --init fills it
# Each method's pretraining epochs on the 60,000 images: as many as fit in about 27 minutes here (the issue's
# budget is 30), from a one-epoch pilot of every method at commit 1787f28 (images/s, 2-core Xeon, bf16):
# SimCLR 836, MoCo v2 558, MoCo v3 567, BYOL 582, BEiT 2077, DeepCluster 1228 (+12 s of k-means an epoch),
# CPC 545, CMC 849 (its two encoders, each on one view). The table states the epochs and the minutes each run took.
# CPC's 15 epochs from that pilot took 40.4 minutes in its run at ecb8483: once trained, its epochs ran at 375-448
# images/s (pilots/cpc_speed.md), so it has 12.
PRETRAIN_EPOCHS = {"simclr": 20, "moco": 15, "mocov3": 15, "byol": 15, "beit": 50, "deepcluster": 25, "cpc": 12,
                   "cmc": 20}  # fmt: skip
# BEiT is judged by fine-tuning at 10 % and 100 % of the labels, each against a from-scratch student of BEiT's total
# epochs (about half an hour a run here); at 1 % it would cost another such run for a column no goal reads.
BEIT_FRACTIONS = (0.1, 1.0)
BEIT_TARGETS = ("kmeans", "dvae", "pixels")
SCRATCH = "from scratch"  # part 3's baseline row: the CNN at its initialisation, fine-tuned by the same recipe
FEW_LABEL_COLUMNS = (
    "supervised",
    "supervised, BEiT's total epochs",
    "BEiT + fine-tune",
    "pretrain + fine-tune (CNN)",
    "SimCLRv2: pretrain + fine-tune + distil",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="every method's (default: PRETRAIN_EPOCHS)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds count from it (one seed's pilot: "
                        "--first-seed 1 --seeds 1)")  # fmt: skip
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.1], help="part 2; none: skip it")
    parser.add_argument("--finetune-fractions", type=float, nargs="*", default=[0.1, 1.0],
                        help="part 3: each CNN method fine-tuned at these label fractions; none: skip it")  # fmt: skip
    parser.add_argument("--simclrv2-method", choices=METHODS, default="simclr", help="whose backbone part 2 uses")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of the pool, labelled images cycled")
    parser.add_argument("--student-epochs", type=int, default=STUDENT_EPOCHS, help="epochs of the pool, as "
                        "label_efficiency.py; other than the default, the students' folders name it")  # fmt: skip
    parser.add_argument("--unlabeled-ratio", type=float, default=0.75, help="unlabelled share of the SimCLRv2 batches")
    parser.add_argument("--simclrv2-distillation", choices=("hard", "soft"), default="hard",
                        help="its student: DeiT's hard distillation, or SimCLRv2's own soft one (tau 1)")  # fmt: skip
    parser.add_argument("--beit-target", choices=BEIT_TARGETS, default="kmeans", help="a masked patch's: k-means "
                        "token, dVAE token, or its pixels")  # fmt: skip
    parser.add_argument("--work-dir", default="runs/self_supervised")
    parser.add_argument("--output", default="benchmarks/results/self_supervised.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the finished runs")
    parser.add_argument("--retrain-before", metavar="COMMIT", help="train again the finished runs visited that a "
                        "commit before COMMIT trained (a fix changed what they compute); each is kept as "
                        "FOLDER-before-COMMIT. Narrow it with --methods and --fractions to what the fix "
                        "touched")  # fmt: skip
    return parser.parse_args(argv)


def finished(folder: Path) -> bool:
    """Whether the run in ``folder`` finished (its summary is written last, after the final evaluation)."""
    return (folder / "summary.json").is_file()


def run_or_read(args: argparse.Namespace, config, folder: Path) -> dict | None:
    """The run in ``folder``, trained if need be, with its folder under --work-dir; None if --report-only and
    it has not finished."""
    if args.report_only and not finished(folder):
        return None
    newer = newer_starts(config, folder) if finished(folder) else []  # its pretraining or teacher ran again since
    if args.report_only and newer:
        logging.warning("%s started from %s, written since it finished: stale, left out of the table", folder,
                        ", ".join(newer))  # fmt: skip
        return None
    if not args.report_only and finished(folder):
        if args.retrain_before and trained_before(folder, args):
            set_aside_to_retrain(args, config, folder, f"was trained before {args.retrain_before}")
        elif newer:
            set_aside_to_retrain(args, config, folder, f"started from {', '.join(newer)}, written since it finished")
    summary = train_or_read(config, folder)
    return summary if summary is None else {**summary, "folder": folder.relative_to(args.work_dir).as_posix()}


def starts(config) -> list[str]:
    """The files a run starts from: its pretrained checkpoint, its teacher, its tokenizer."""
    return [path for path in (config.model.init, config.distill.teacher_path, config.pretrain.tokenizer) if path]


def newer_starts(config, folder: Path) -> list[str]:
    """The pretrained checkpoint or teacher of the finished run in ``folder``, if written after it finished.

    Not the tokenizer: it is fitted once per work folder, the same from the same images, and fitted again only
    where its file was lost; that leaves the runs it served as they were.
    """
    finished_at = (folder / "summary.json").stat().st_mtime
    return [path for path in starts(config) if path != config.pretrain.tokenizer
            and Path(path).is_file() and Path(path).stat().st_mtime > finished_at]  # fmt: skip


def set_aside_to_retrain(args: argparse.Namespace, config, folder: Path, why: str) -> None:
    """Move the finished run in ``folder`` (which ``why``) to FOLDER-before-NAME (-2, -3... if an earlier one is
    there; NAME: the --retrain-before commit, else this checkout's), so that it trains again; unless what it
    starts from is gone, in which case it stays and is read."""
    missing = [path for path in starts(config) if not Path(path).is_file()]
    if missing:
        logging.warning("%s %s, but cannot train again without %s: read as it is", folder, why, ", ".join(missing))
        return
    tag = args.retrain_before or commit().split()[0]
    names = (f"{folder.name}-before-{tag}{'' if copy == 1 else f'-{copy}'}" for copy in itertools.count(1))
    aside = next(folder.with_name(name) for name in names if not folder.with_name(name).exists())
    folder.rename(aside)
    logging.info("%s %s: kept as %s, trained again", folder, why, aside)


def resolved_commit(ref: str) -> str:
    """``ref`` (a hash, a tag, a branch) as the short hash of its commit; a clear error if git has none such."""
    answer = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--verify", "--short", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)  # fmt: skip
    if answer.returncode != 0:
        raise ValueError(f"--retrain-before {ref}: no such commit in {CHECKOUT}")
    return answer.stdout.strip()


def trained_before(folder: Path, args: argparse.Namespace) -> bool:
    """Whether the finished run in ``folder`` was trained at a commit that does not contain --retrain-before's.
    A run whose commit git does not know (recorded as unknown, or from another clone) is kept, with a warning."""
    run_commit = json.loads((folder / "summary.json").read_text()).get("commit", "unknown").split(" ")[0]
    # exit 0: the fix is an ancestor of (or is) the run's commit; 1: it is not; anything else: git cannot tell
    answer = subprocess.run(["git", "-C", str(CHECKOUT), "merge-base", "--is-ancestor", args.retrain_before,
                             run_commit], capture_output=True, text=True)  # fmt: skip
    if answer.returncode not in (0, 1):
        logging.warning("cannot tell whether %s (trained at commit %r) predates %s: read as it is", folder,
                        run_commit, args.retrain_before)  # fmt: skip
    return answer.returncode == 1


def restore_finished_runs(args: argparse.Namespace) -> int:
    """Write the finished runs that the table's JSON records (summary, and a pretraining's probe) into
    --work-dir where their folders are missing; returns how many. Checkpoints are not in the record; the
    settings are, for runs since summaries kept them."""
    saved = Path(args.output).with_suffix(".json")
    if not saved.is_file():
        return 0
    table = json.loads(saved.read_text())
    records = [(summary, probe) for runs in table.get("pretrained", {}).values() for summary, probe in runs]
    records += [(summary, None) for part in ("few_labels", "fine_tuned") for runs in table.get(part, {}).values()
                for summaries in runs.values() for summary in summaries]  # fmt: skip
    restored = 0
    for summary, probe in records:
        if "folder" not in summary:  # recorded before runs named their folders
            continue
        folder = Path(args.work_dir) / summary["folder"]
        if folder.exists():  # finished, or being trained again (--retrain-before): never over what is there
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if probe is not None:
            (folder / "probe.json").write_text(json.dumps(probe, indent=1))
        if "config" in summary:  # what a later invocation's settings are compared with
            (folder / "config.yaml").write_text(yaml.safe_dump(summary["config"], sort_keys=False))
        # where it was read from, and how it differed from what that invocation asked, are not the run's own
        own = {key: value for key, value in summary.items() if key not in ("folder", "settings_differing")}
        (folder / "summary.json").write_text(json.dumps(own))
        restored += 1
    return restored


def tokenizer(args: argparse.Namespace, *, fit: bool = True) -> Path:
    """BEiT's visual tokenizer (``--beit-target`` kmeans or dvae) for 7 px patches of Fashion-MNIST, fitted once
    (unless not ``fit``: only its path, for a run that will not train)."""
    path = Path(args.work_dir) / f"tokenizer-{args.beit_target}-p7-256.safetensors"
    if fit and not path.is_file():
        train_loader, val_loader, info = build_probe_data("fashion-mnist", None, batch_size=1024)
        images, held_out = (torch.cat([batch for batch, _ in loader]) for loader in (train_loader, val_loader))
        train_tokenizer(images, patch_size=7, codebook_size=256, dataset=info.name, kind=args.beit_target,
                        held_out=held_out).save(path)  # fmt: skip
    return path


def run_name(args: argparse.Namespace, method: str) -> str:
    """A method's name in folders; BEiT's names its target too unless it is the k-means tokenizer (the table's)."""
    return method if method != "beit" or args.beit_target == "kmeans" else f"beit-{args.beit_target}"


def pretrain_folder(args: argparse.Namespace, method: str, seed: int) -> Path:
    return Path(args.work_dir) / "pretrain" / run_name(args, method) / f"seed{seed}"


def pretrain_epochs(args: argparse.Namespace, method: str) -> int:
    return args.pretrain_epochs or PRETRAIN_EPOCHS[method]


def pretrain(args: argparse.Namespace, method: str, seed: int) -> tuple[dict, Path]:
    folder = pretrain_folder(args, method, seed)
    overrides = {"pretrain.method": method, "run.seed": seed, "run.output_dir": str(folder), "run.resume": "auto",
                 "run.progress": not args.no_progress}  # fmt: skip
    if method == "beit":
        overrides["model.name"] = BEIT_MODEL
        if args.beit_target == "pixels":
            overrides["pretrain.mask_target"] = "pixels"
        else:
            overrides["pretrain.tokenizer"] = str(tokenizer(args, fit=not (finished(folder) or args.report_only)))
    overrides["optim.epochs"] = pretrain_epochs(args, method)
    return run_or_read(args, with_overrides(load_config(PRETRAIN_PRESET), overrides), folder), folder / "checkpoint.pth"


def probe(args: argparse.Namespace, checkpoint: Path, seed: int) -> list[dict] | None:
    """The linear probe of ``checkpoint`` and its baselines, on all the labels; kept beside the run."""
    saved = checkpoint.parent / "probe.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    if args.report_only:
        return None
    scores = [asdict(score) for score in probe_checkpoint(checkpoint, seed=seed, device="auto", amp="auto")]
    saved.write_text(json.dumps(scores, indent=1))
    return scores


def label_fraction_folder(args: argparse.Namespace, fraction: float, seed: int) -> Path:
    return Path(args.work_dir) / f"labels{fraction:g}" / f"seed{seed}"


def few_label_run(
    args: argparse.Namespace, fraction: float, seed: int, preset: str, folder: str, **overrides
) -> dict | None:
    """One run of parts 2 and 3 (trained, or read back if finished) at a label fraction and seed."""
    work = label_fraction_folder(args, fraction, seed) / folder
    values = {"data.label_fraction": fraction if fraction < 1 else None, "data.unlabeled_ratio": args.unlabeled_ratio,
              "run.seed": seed, "run.resume": "auto", "run.progress": not args.no_progress,
              "run.output_dir": str(work), **overrides}  # fmt: skip
    return run_or_read(args, with_overrides(load_config(preset), values), work)


def cnn_finetune_folder(method: str) -> str:
    return "cnn_scratch" if method == SCRATCH else f"{method}_finetune"


def cnn_finetune(
    args: argparse.Namespace, fraction: float, seed: int, method: str, checkpoint: Path | None
) -> dict | None:
    """``method``'s pretrained CNN (None: the CNN from scratch) trained on the labels by ``FINETUNE_PRESET``."""
    init = {} if checkpoint is None else {"model.init": str(checkpoint)}
    return few_label_run(
        args, fraction, seed, FINETUNE_PRESET, cnn_finetune_folder(method),
        **{"model.name": load_config(PRETRAIN_PRESET).model.name, "optim.epochs": args.finetune_epochs, **init},
    )  # fmt: skip


def student_folder(args: argparse.Namespace, name: str) -> str:
    """A DeiT student's folder in part 2: named by its epochs too where they are not the table's."""
    return name if args.student_epochs == STUDENT_EPOCHS else f"{name}_{args.student_epochs}_epochs"


def seeds(args: argparse.Namespace) -> range:
    return range(args.first_seed, args.first_seed + args.seeds)


def few_labels(args: argparse.Namespace, fraction: float, seed: int, checkpoints: dict[str, Path]) -> dict[str, dict]:
    """Part 2's columns at one label fraction and seed, from the pretrained ``checkpoints`` (method -> path).

    A column trains where the checkpoint it starts from is on disk, and is read back where it finished;
    otherwise it is left out.
    """
    work = label_fraction_folder(args, fraction, seed)

    def run(preset: str, folder: str, **overrides) -> dict | None:
        return few_label_run(args, fraction, seed, preset, folder, **overrides)

    def ready(start: Path | None, folder: str) -> bool:
        return (start is not None and start.is_file()) or finished(work / folder)

    supervised = student_folder(args, "supervised")
    results = {"supervised": run(STUDENT_PRESET, supervised, **{"optim.epochs": args.student_epochs})}
    beit, beit_folder = checkpoints.get("beit"), student_folder(args, f"{run_name(args, 'beit')}_finetune")
    if fraction in BEIT_FRACTIONS and ready(beit, beit_folder):  # against the student from scratch, its total epochs
        epochs = pretrain_epochs(args, "beit")
        results["supervised, BEiT's total epochs"] = run(
            STUDENT_PRESET, student_folder(args, "supervised_long"), **{"optim.epochs": args.student_epochs + epochs}
        )
        results["BEiT + fine-tune"] = run(
            STUDENT_PRESET, beit_folder, **{"optim.epochs": args.student_epochs, "model.init": str(beit)}
        )
    cnn = checkpoints.get(args.simclrv2_method)  # None: the caller asks for BEiT's columns only
    finetune = cnn_finetune_folder(args.simclrv2_method)  # named by its backbone's method: two methods' never mix
    if fraction >= 1 or cnn is None or not ready(cnn, finetune):
        return {column: summary for column, summary in results.items() if summary is not None}
    results["pretrain + fine-tune (CNN)"] = cnn_finetune(args, fraction, seed, args.simclrv2_method, cnn)
    student, teacher = f"simclrv2_{args.simclrv2_method}", work / finetune / "checkpoint.pth"
    if args.simclrv2_distillation != "hard":  # the table's is hard: its folder keeps the name it had
        student += f"_{args.simclrv2_distillation}"
    student = student_folder(args, student)
    if ready(teacher, student):
        results["SimCLRv2: pretrain + fine-tune + distil"] = run(
            STUDENT_PRESET, student,
            **{"optim.epochs": args.student_epochs, "distill.type": args.simclrv2_distillation,
               "distill.teacher_path": str(teacher), "run.eval_teacher": False},
        )  # fmt: skip
    return {column: summary for column, summary in results.items() if summary is not None}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.retrain_before:
        args.retrain_before = resolved_commit(args.retrain_before)  # a ref that moves would retrain other runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    restored = restore_finished_runs(args)  # before the first write replaces the JSON they are read from
    if restored:
        logging.info("%d finished run(s) restored into %s from %s", restored, args.work_dir,
                     Path(args.output).with_suffix(".json"))  # fmt: skip
    pretrained: dict[str, list[tuple[dict, list[dict]]]] = {}
    for seed in seeds(args):
        for method in args.methods:
            logging.info("pretrain %s, seed %d", method, seed)
            summary, checkpoint = pretrain(args, method, seed)
            scores = None if summary is None else probe(args, checkpoint, seed)
            if scores is not None:
                pretrained.setdefault(method, []).append((summary, scores))
                write(args, argv, pretrained, {}, started)  # a table after every run, so a stopped one shows its rows
    few: dict[float, dict[str, list[dict]]] = {}
    for seed in seeds(args) if args.fractions else ():
        checkpoints = {method: pretrain_folder(args, method, seed) / "checkpoint.pth"
                       for method in (args.simclrv2_method, "beit")}  # fmt: skip
        for fraction in [*args.fractions, 1.0]:
            logging.info("labels %g, seed %d", fraction, seed)
            columns = few_labels(args, fraction, seed, checkpoints)
            for column, summary in columns.items():
                few.setdefault(fraction, {}).setdefault(column, []).append(summary)
            write(args, argv, pretrained, few, started)
    tuned: dict[str, dict[float, list[dict]]] = {}  # part 3: method (or SCRATCH) -> label fraction -> runs
    for seed in seeds(args) if args.finetune_fractions else ():
        checkpoints = {method: pretrain_folder(args, method, seed) / "checkpoint.pth"
                       for method in args.methods if method != "beit"}  # fmt: skip
        for fraction in args.finetune_fractions:
            logging.info("each method fine-tuned, labels %g, seed %d", fraction, seed)
            done = label_fraction_folder(args, fraction, seed)
            for method, checkpoint in [(SCRATCH, None), *checkpoints.items()]:
                if checkpoint is None or checkpoint.is_file() or finished(done / cnn_finetune_folder(method)):
                    summary = cnn_finetune(args, fraction, seed, method, checkpoint)
                    if summary is not None:
                        tuned.setdefault(method, {}).setdefault(fraction, []).append(summary)
                        write(args, argv, pretrained, few, started, tuned)
    print(write(args, argv, pretrained, few, started, tuned))
    return 0


def write(args, argv, pretrained, few, started, tuned=None) -> str:
    """Write the table (and its JSON) with the runs so far; return its text."""
    text = report(args, argv, pretrained, few, started, tuned)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    Path(args.output).with_suffix(".json").write_text(json.dumps(
        {"argv": argv, "commit": commit(), "pretrained": pretrained, "few_labels": {str(k): v for k, v in few.items()},
         "fine_tuned": {method: {str(k): v for k, v in runs.items()} for method, runs in (tuned or {}).items()}},
        indent=1,
    ))  # fmt: skip
    return text


def report(args, argv, pretrained, few, started, tuned=None) -> str:
    config = load_config(PRETRAIN_PRESET)
    lines = [
        "# Self-supervised pretraining on Fashion-MNIST",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/self_supervised.py', *argv])}`",
        "",
        f"Written at commit {commit()}, each row trained at the commit it names; this invocation took "
        f"{(time.perf_counter() - started) / 60:.0f} min (finished runs are read, not retrained). Mean ± std over "
        "seeds (a figure without ± is one seed); top-1 (%) on the 10,000 test images.",
        "",
        "## The representation",
        "",
        f"Backbone `{config.model.name}` (BEiT: `{BEIT_MODEL}`), pretrained without labels on the 60,000 training "
        "images for the epochs of its row, as many as fit in about 27 minutes here "
        f"(preset `{PRETRAIN_PRESET}`: batch {config.optim.batch_size}, AdamW). `deit linear-probe` then "
        "fits a logistic regression (L-BFGS, C = 1) on the frozen features of all 60,000 labelled images; kNN: "
        "k = 20, T = 0.07, cosine.",
        "",
        "| method | epochs | seeds | linear probe | kNN | random init: linear / kNN | raw pixels: linear / kNN "
        "| minutes per run | machine: matmul GFLOP/s, fp32 / bf16 | trained at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for method, runs in pretrained.items():
        scores = [probe for _, probe in runs]

        def column(row: int, key: str, scores=scores) -> str:
            return mean_std([score[row][key] for score in scores])

        minutes = whole_minutes([summary for summary, _ in runs])
        lines.append(
            f"| {run_name(args, method)} | {epochs_of(args, method, runs)} | {len(runs)} | {column(0, 'linear_acc1')} "
            f"| {column(0, 'knn_acc1')} | {column(1, 'linear_acc1')} / {column(1, 'knn_acc1')} "
            f"| {column(2, 'linear_acc1')} / {column(2, 'knn_acc1')} | {minutes} "
            f"| {machines([summary for summary, _ in runs])} | {trained_at(runs)} |"
        )
    if few:
        header = ["| labels | " + " | ".join(FEW_LABEL_COLUMNS) + " |", "|---|" + "---:|" * len(FEW_LABEL_COLUMNS)]
        lines += [
            "",
            "## Few labels",
            "",
            f"The DeiT student (`{load_config(STUDENT_PRESET).model.name}`) trains for {args.student_epochs} epochs "
            f"of the 60,000-image pool; with a fraction of the labels, the labelled images are cycled. "
            f"Pretrain + fine-tune: the {args.simclrv2_method} backbone, `--init` into `{FINETUNE_PRESET}`'s recipe, "
            f"{args.finetune_epochs} epochs of the pool. SimCLRv2: that network teaches the student by "
            f"{args.simclrv2_distillation} distillation on all the images, {args.unlabeled_ratio:.0%} of each batch "
            "unlabelled.",
            "",
            *header,
        ]
        for fraction, columns in sorted(few.items()):
            cells = [mean_std([run["final"]["acc1"] for run in columns[name]]) if name in columns else "n/a"
                     for name in FEW_LABEL_COLUMNS]  # fmt: skip
            lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
        lines += ["", "Minutes per run (mean over seeds):", "", *header]
        for fraction, columns in sorted(few.items()):
            cells = [whole_minutes(columns[name]) if name in columns else "n/a"
                     for name in FEW_LABEL_COLUMNS]  # fmt: skip
            lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    if tuned:
        lines += ["", *fine_tuned_table(args, tuned)]
    lines += ["", "## Goals", "", *goals(args, pretrained, few)]
    return "\n".join(lines) + "\n"


def epochs_of(args: argparse.Namespace, method: str, runs: list) -> str:
    """The epochs the runs of a row pretrained for, as their settings say (the budget asked where none is saved);
    a row whose seeds differ names each."""
    asked = pretrain_epochs(args, method)
    epochs = {(summary.get("config") or {}).get("optim", {}).get("epochs", asked) for summary, _ in runs}
    return ", ".join(str(count) for count in sorted(epochs))


def fine_tuned_table(args: argparse.Namespace, tuned: dict[str, dict[float, list[dict]]]) -> list[str]:
    """Part 3: top-1 and minutes of each method's CNN fine-tuned, per label fraction, beside the CNN from scratch."""
    fractions = sorted({fraction for runs in tuned.values() for fraction in runs})
    lines = [
        "## Each method fine-tuned",
        "",
        f"`{load_config(PRETRAIN_PRESET).model.name}` trained on the labels by `{FINETUNE_PRESET}`'s recipe for "
        f"{args.finetune_epochs} epochs of the pool, from each method's pretrained backbone (`deit train --init`) "
        "or from scratch. CMC's is its first encoder (the intensity view's). Top-1 (%), and minutes per run.",
        "",
        "| start | " + " | ".join(f"{fraction:.0%} labels | minutes" for fraction in fractions) + " |",
        "|---|" + "---:|---:|" * len(fractions),
    ]
    for method, runs in tuned.items():
        cells = []
        for fraction in fractions:
            found = runs.get(fraction, [])
            cells += [mean_std([run["final"]["acc1"] for run in found]), whole_minutes(found)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def trained_at(runs: list) -> str:
    """The commits a method's runs were trained at (a table read back holds runs of several sessions)."""
    return ", ".join(dict.fromkeys(summary.get("commit", "not recorded") for summary, _ in runs))


def goals(args: argparse.Namespace, pretrained: dict, few: dict) -> list[str]:
    def mean_of(runs: list, row: int) -> float:
        return statistics.mean(probe[row]["linear_acc1"] for _, probe in runs)

    lines = []
    for method, runs in pretrained.items():
        beats = mean_of(runs, 0) > max(mean_of(runs, 1), mean_of(runs, 2))
        lines.append(f"- {run_name(args, method)}: the linear probe beats random init and raw pixels: "
                     f"**{'yes' if beats else 'no'}**")  # fmt: skip
    if pretrained:
        # each run, not each method's mean: the goal is every pretraining's; the machine's measure beside it,
        # since machines of one kind (and one machine over a day) differ
        over = [f"{run_name(args, method)} {summary['minutes']:.1f} ({machines([summary])})"
                for method, runs in pretrained.items() for summary, _ in runs
                if whole_run_minutes([summary]) and summary["minutes"] > 30]  # fmt: skip
        lines.append(f"- Each pretraining ≤ 30 minutes: **{'no' if over else 'yes'}**"
                     + (f" ({', '.join(over)}; machine: matmul GFLOP/s, fp32 / bf16)" if over else ""))  # fmt: skip
        best = max(pretrained, key=lambda method: mean_of(pretrained[method], 0))
        met = mean_of(pretrained[best], 0) >= 88
        lines.append(f"- A linear probe ≥ 88 %: **{'yes' if met else 'no'}** (best: {run_name(args, best)}, "
                     f"{mean_of(pretrained[best], 0):.2f})")  # fmt: skip

    def top1(runs: list[dict]) -> float:
        return statistics.mean(run["final"]["acc1"] for run in runs)

    tenth = few.get(0.1, {})
    simclrv2, full = tenth.get("SimCLRv2: pretrain + fine-tune + distil"), few.get(1.0, {}).get("supervised")
    if simclrv2 and full:
        ours, mark = top1(simclrv2), top1(full)
        lines.append(f"- With 10 % of the labels, SimCLRv2 reaches the supervised student on 100 %: "
                     f"**{'yes' if ours >= mark else 'no'}** ({ours:.2f} against {mark:.2f})")  # fmt: skip
    beit, scratch = tenth.get("BEiT + fine-tune"), tenth.get("supervised, BEiT's total epochs")
    if beit and scratch:
        ours, mark = top1(beit), top1(scratch)
        lines.append(f"- With 10 % of the labels, {run_name(args, 'beit')} + fine-tune beats the student from "
                     f"scratch for the same total epochs: **{'yes' if ours > mark else 'no'}** "
                     f"({ours:.2f} against {mark:.2f})")  # fmt: skip
    return lines


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
