"""The ``deit`` command line: each subcommand builds a config and calls the library.

deit train --config fashion_mnist --teacher-path runs/teacher/checkpoint.pth --distillation-type hard
deit eval --checkpoint runs/student/checkpoint.pth
deit pretrain --method simclr --model deit_nano_patch7_28 --output-dir runs/simclr
deit linear-probe --checkpoint runs/simclr/checkpoint.pth --label-fraction 0.1
deit tokenizer --patch-size 4 --output runs/tokens.safetensors
deit pretrain --method beit --tokenizer runs/tokens.safetensors --model deit_nano_patch4_28 --output-dir runs/beit
deit train --config fashion_mnist --init runs/simclr/checkpoint.pth --output-dir runs/from-simclr
deit export --checkpoint runs/student/checkpoint.pth --format onnx --output student.onnx
deit predict --checkpoint runs/student/checkpoint.pth shirt.png boot.jpg
deit analyze --checkpoint runs/student/checkpoint.pth --teacher runs/teacher/checkpoint.pth --output-dir analysis
deit plot runs/student runs/baseline --output curves.png
deit report runs/student --analysis analysis --output report.html
deit verify-data --data-path data
deit noisy-student --config fashion_mnist_noisy_student --output-dir runs/noisy-student
deit pseudo-label --teacher-path runs/teacher/checkpoint.pth --label-fraction 0.1 --output labels.safetensors
deit benchmark --model deit_tiny_distilled_patch16_224 resnet18 --batch-size 64 --dtype fp32 bf16
deit demo
deit models [PATTERN]
torchrun --nproc_per_node 2 -m deit train ...   (each process runs this same command line)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from deit.cli.analysis import add_analyze_parser, add_plot_parser, add_report_parser
from deit.cli.bench import add_benchmark_parser
from deit.cli.pretrain import add_linear_probe_parser, add_pretrain_parser, add_tokenizer_parser
from deit.cli.semi import add_noisy_student_parser, add_pseudo_label_parser
from deit.cli.tools import add_export_parser, add_models_parser, add_predict_parser, add_verify_data_parser
from deit.cli.train import add_demo_parser, add_eval_parser, add_train_parser
from deit.engine import NonFiniteLossError
from deit.errors import DeitError
from deit.interrupts import RunInterrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deit",
        description="Data-efficient image transformers: train DeiT students distilled from CNN teachers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (
        add_train_parser,
        add_pretrain_parser,
        add_tokenizer_parser,
        add_linear_probe_parser,
        add_eval_parser,
        add_export_parser,
        add_predict_parser,
        add_analyze_parser,
        add_plot_parser,
        add_report_parser,
        add_benchmark_parser,
        add_demo_parser,
        add_pseudo_label_parser,
        add_noisy_student_parser,
        add_verify_data_parser,
        add_models_parser,
    ):
        add_parser(subparsers)
    return parser


def _user_error(error: BaseException) -> bool:
    """Bad input: one of ours, or the system refusing a file the user named. Anything else is a bug."""
    return isinstance(error, DeitError) or (isinstance(error, OSError) and error.filename is not None)


# exit codes besides 0: 1 some inputs failed (predict, verify-data), 2 bad input or settings,
# 3 the loss or the weights stopped being finite, 128 + N stopped by signal N after writing a checkpoint
EXIT_NON_FINITE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, only rank 0 reports progress
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.handler(args)
    except (DeitError, OSError) as error:
        if args.verbose or not _user_error(error):
            raise  # a bug keeps its traceback, and Python's exit code 1
        print(f"deit: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"deit: error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE
    except RunInterrupted as stopped:
        print(f"deit: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("deit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
