"""BEiT's target, measured: a k-means tokenizer, a small discrete VAE, or the masked patches' pixels.

Issue 19 asks which tokenizer serves BEiT better. Each target pretrains the
student's ViT (``deit_nano_patch7_28``) on the 60,000 Fashion-MNIST images
for BEiT's epochs in ``self_supervised.PRETRAIN_EPOCHS``, with the same
masking, and is judged the way BEiT is judged: the student fine-tuned from it
(``deit train --init``) with a tenth of the labels, against the same student
from scratch for the same total epochs. Beside that: the tokenizer's own
figures on held-out patches (how much of a patch its token keeps, and how
many tokens carry the data), the linear probe and kNN, and the minutes.

The runs are ``benchmarks/self_supervised.py``'s own, in its work folder: the
k-means rows are the main table's, and the from-scratch student is shared.

    python benchmarks/beit_targets.py --seeds 1 --no-progress
    python benchmarks/beit_targets.py --pretrain-epochs 1 --student-epochs 1 --work-dir /tmp/bt \\
        --output /tmp/bt.md                                                  # smoke test

Finished runs are read, not retrained, so an interrupted table continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from pathlib import Path

import self_supervised
from distillation_table import commit, machines, mean_std, whole_minutes

from deit.ssl.masking import BlockMasks
from deit.ssl.tokenizer import PatchTokenizer

FRACTION = 0.1  # where issue 19 judges BEiT


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=self_supervised.BEIT_TARGETS,
                        default=list(self_supervised.BEIT_TARGETS))  # fmt: skip
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: BEiT's in PRETRAIN_EPOCHS")
    parser.add_argument("--student-epochs", type=int, default=10, help="epochs of the pool, as self_supervised.py")
    parser.add_argument("--work-dir", default="runs/self_supervised")
    parser.add_argument("--output", default="benchmarks/results/beit_targets.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def table_args(args: argparse.Namespace, target: str) -> argparse.Namespace:
    """``self_supervised.py``'s options for one target, so that its runs and folders are the main table's."""
    argv = ["--work-dir", args.work_dir, "--beit-target", target, "--student-epochs", str(args.student_epochs)]
    if args.pretrain_epochs:
        argv += ["--pretrain-epochs", str(args.pretrain_epochs)]
    return self_supervised.parse_args(argv + (["--no-progress"] if args.no_progress else []))


def measure(args: argparse.Namespace, target: str, seed: int) -> dict:
    """One target and seed: its pretraining, its probe, and the student at a tenth of the labels from it and not."""
    options = table_args(args, target)
    summary, checkpoint = self_supervised.pretrain(options, "beit", seed)
    probe = self_supervised.probe(options, checkpoint, seed)
    students = self_supervised.few_labels(options, FRACTION, seed, {"beit": checkpoint})
    tokenizer = None if target == "pixels" else PatchTokenizer.load(self_supervised.tokenizer(options)).info
    return {
        "pretrain": summary,
        "probe": probe,
        "finetune": students["BEiT + fine-tune"],
        "scratch": students["supervised, BEiT's total epochs"],
        "tokenizer": tokenizer and {"mse": tokenizer.reconstruction_mse, "perplexity": tokenizer.perplexity},
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for target in args.targets:
            logging.info("BEiT, %s target, seed %d", target, seed)
            results.setdefault(target, []).append(measure(args, target, seed))
            write(args, argv, results)  # after every run, so a stopped table shows its rows
    print(write(args, argv, results))
    return 0


def write(args: argparse.Namespace, argv: list[str], results: dict[str, list[dict]]) -> str:
    text = report(args, argv, results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    Path(args.output).with_suffix(".json").write_text(json.dumps({"argv": argv, "commit": commit(), "results": results},
                                                                 indent=1))  # fmt: skip
    return text


def report(args: argparse.Namespace, argv: list[str], results: dict[str, list[dict]]) -> str:
    epochs = args.pretrain_epochs or self_supervised.PRETRAIN_EPOCHS["beit"]
    lines = [
        "# BEiT's target: k-means tokens, dVAE tokens, or pixels",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/beit_targets.py', *argv])}`",
        "",
        f"Written at commit {commit()}, each row pretrained at the commit it names (finished runs are read, not "
        f"retrained). `{self_supervised.BEIT_MODEL}` pretrained by BEiT for {epochs} epochs of the "
        f"60,000 Fashion-MNIST images, {BlockMasks(grid=4).target} of its 16 patches masked in blocks (40 % rounded, "
        "never overshot, as BEiT's code does). Fine-tuned: the student started from "
        f"it, {args.student_epochs} epochs of the pool with {FRACTION:.0%} of the labels; from scratch: the same "
        f"student for {args.student_epochs + epochs} epochs, the same total. Tokenizer: 256 tokens of 7 px patches; "
        "on held-out patches, the mean squared error of a patch against its token's picture (normalised pixels) and "
        "the perplexity of the tokens' use. Mean ± std over seeds; top-1 (%) on the 10,000 test images.",
        "",
        "| target | seeds | tokenizer error | perplexity | fine-tuned, 10 % labels | from scratch, same epochs "
        "| linear probe | kNN | pretraining minutes | machine: matmul GFLOP/s, fp32 / bf16 | pretrained at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for target, runs in results.items():
        tokenizer = runs[0]["tokenizer"]  # fitted once, shared by the seeds
        error, perplexity = (f"{tokenizer['mse']:.4f}", f"{tokenizer['perplexity']:.0f}") if tokenizer else ("n/a",) * 2

        def top1(part: str, runs=runs) -> str:
            return mean_std([run[part]["final"]["acc1"] for run in runs])

        def probe(key: str, runs=runs) -> str:
            return mean_std([run["probe"][0][key] for run in runs])

        pretrained = [run["pretrain"] for run in runs]
        commits = ", ".join(dict.fromkeys(summary.get("commit", "not recorded") for summary in pretrained))
        lines.append(f"| {target} | {len(runs)} | {error} | {perplexity} | {top1('finetune')} | {top1('scratch')} "
                     f"| {probe('linear_acc1')} | {probe('knn_acc1')} | {whole_minutes(pretrained)} "
                     f"| {machines(pretrained)} | {commits} |")  # fmt: skip
    if results:
        best = max(results, key=lambda target: fine_tuned(results[target]))
        lines += ["", f"Best fine-tuned at {FRACTION:.0%} of the labels: **{best}** ({fine_tuned(results[best]):.2f})."]
    return "\n".join(lines) + "\n"


def fine_tuned(runs: list[dict]) -> float:
    return statistics.mean(run["finetune"]["final"]["acc1"] for run in runs)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
