"""``deit analyze`` and ``deit plot``: what a trained student learned, and how its runs went."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deit.data import DataError


def add_analyze_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="per-head accuracy, agreement with the teacher, token similarity, attention maps",
        description="Analyse a trained student on its validation set: top-1 of each head and fusion, agreement "
        "between labels, teacher, an undistilled baseline and each head, cosine between the class and "
        "distillation tokens at every layer, a confusion matrix, and attention maps of both tokens.",
    )
    parser.add_argument("--checkpoint", required=True, help="a deit train checkpoint of the student")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data-set", help="default: the checkpoint's data set")
    parser.add_argument("--data-path", help="default: the checkpoint's data path")
    parser.add_argument("--teacher", help="the teacher's checkpoint (a deit train checkpoint)")
    parser.add_argument("--baseline", help="a student trained without distillation, for the agreement table")
    parser.add_argument("--num-images", type=int, default=8, help="images in the attention-map grid")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(handler=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from deit.analysis.analyze import analyze_checkpoint

    result = analyze_checkpoint(
        args.checkpoint,
        args.output_dir,
        dataset=args.data_set,
        data_path=args.data_path,
        teacher=args.teacher,
        baseline=args.baseline,
        num_images=args.num_images,
        device=args.device,
    )
    print("top-1 (%): " + ", ".join(f"{name} {value:.2f}" for name, value in result["top1"].items()))
    names = result["agreement"]["predictors"]
    print("agreement (%):\n" + " " * 12 + "".join(f"{name:>11}" for name in names))
    for name, row in zip(names, result["agreement"]["percent"], strict=True):
        print(f"{name:>12}" + "".join(f"{value:11.2f}" for value in row))
    if "token_cosine" in result:
        cosines = result["token_cosine"]
        print(f"cosine(class, distillation token): input {cosines['input']:.2f}, output {cosines['output']:.2f}; "
              f"heads' weights {result['head_weight_cosine']:.2f}")  # fmt: skip
    print(f"wrote {args.output_dir}")
    return 0


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="training curves of one or more runs",
        description="Draw train loss, learning rate and each head's validation top-1 per epoch from the runs' "
        "metrics.jsonl, all runs on one figure.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from deit.analysis import figures

    folders = [Path(run) for run in args.runs]
    unique_names = len({folder.name for folder in folders}) == len(folders)  # else label runs by their paths
    runs = {}
    for folder in folders:
        log_file = folder / "metrics.jsonl"
        if not log_file.is_file():
            raise DataError(f"{folder} holds no metrics.jsonl: is it the --output-dir of a deit train run?")
        records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        if not records:
            raise DataError(f"{log_file} is empty: the run has not finished an epoch yet")
        runs[folder.name if unique_names else str(folder)] = records
    path = figures.save(figures.curves_figure(runs), Path(args.output))
    print(f"wrote {path}")
    return 0


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="one self-contained HTML page of a run (and its analysis)",
        description="Write an HTML report of a deit train run: final metrics of every head, training curves, "
        "the config, and with --analysis the figures and tables of deit analyze. Pictures are embedded, so the "
        "file reads offline.",
    )
    parser.add_argument("run", metavar="RUN_DIR")
    parser.add_argument("--analysis", help="an output directory of deit analyze")
    parser.add_argument("--output", required=True, help="HTML file to write")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from deit.analysis.report import build_report
    from deit.files import atomic_path

    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise DataError(f"{args.run} holds no metrics.jsonl: is it the --output-dir of a deit train run?")
    if args.analysis and not (Path(args.analysis) / "analysis.json").is_file():
        raise DataError(f"{args.analysis} holds no analysis.json: give an output directory of deit analyze")
    with atomic_path(args.output) as tmp:
        tmp.write_text(build_report(args.run, args.analysis))
    print(f"wrote {args.output}")
    return 0
