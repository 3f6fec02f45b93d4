"""``deit benchmark``: a table of images/s and peak memory, like the paper's model table."""

from __future__ import annotations

import argparse
import functools
import json

from deit.benchmark import DTYPES, BenchmarkError, Throughput, largest_batch, measure_throughput
from deit.distributed import resolve_device


def add_benchmark_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="images/s and peak memory of models, for inference or training",
        description="Measure throughput as the paper does: warm-up, then timed iterations (synchronised on GPU), "
        "the median of repeats. One row per model and dtype.",
    )
    parser.add_argument("--model", nargs="+", required=True, help="deit variants or timm models (teachers too)")
    parser.add_argument("--batch-size", default="64", help="images per batch, or 'auto': the largest power of two")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["fp32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--train", action="store_true", help="a training step instead of inference")
    parser.add_argument("--teacher", help="with --train: also run this frozen teacher in each step")
    parser.add_argument(
        "--attn-impl", choices=("auto", "sdpa", "math"),
        help="our DeiT models' attention kernel (default auto: math on CPU under bf16, else sdpa)",
    )  # fmt: skip
    parser.add_argument("--peak", action="store_true", help="count each step's GFLOP and report the share of the "
                        "measured matmul peak of its dtype")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_benchmark)


def run_benchmark(args: argparse.Namespace) -> int:
    if args.teacher and not args.train:
        raise BenchmarkError("--teacher measures a distillation training step: add --train")
    rows = []
    for name in args.model:
        for dtype in args.dtype:
            measure = functools.partial(
                measure_throughput, name, input_size=args.input_size, in_chans=args.in_chans,
                num_classes=args.num_classes, dtype=dtype, compile=args.compile, train=args.train,
                teacher=args.teacher, device=args.device, iters=args.iters, repeats=args.repeats,
                attn_impl=args.attn_impl, peak=args.peak,
            )  # fmt: skip
            if args.batch_size == "auto":
                rows.append(
                    largest_batch(lambda batch, measure=measure: measure(batch_size=batch), resolve_device(args.device))
                )
            else:
                rows.append(measure(batch_size=int(args.batch_size)))
    print(json.dumps([row.to_dict() for row in rows], indent=2) if args.json else table(rows))
    return 0


def table(rows: list[Throughput]) -> str:
    lines = [
        f"{'model':<36} {'params':>8} {'res':>4} {'batch':>5} {'dtype':>5} {'attn':>5} {'compiled':>8} {'mode':<24} "
        f"{'im/s':>9} {'peak MB':>8} {'teacher':>7} {'GFLOP/im':>8} {'% peak':>6}"
    ]
    for row in rows:
        share = f"{100 * row.teacher_share:6.1f}%" if row.teacher_share is not None else ""
        flops = f"{row.gflop_per_image:8.2f}" if row.gflop_per_image is not None else ""
        peak = f"{100 * row.peak_share:6.1f}" if row.peak_share is not None else ""
        lines.append(
            f"{row.model:<36} {row.params_m:7.1f}M {row.resolution:>4} {row.batch:>5} {row.dtype:>5} "
            f"{row.attention or '':>5} {'yes' if row.compiled else 'no':>8} {row.mode:<24} {row.images_per_sec:9.1f} "
            f"{row.peak_memory_mb:8.0f} {share:>7} {flops:>8} {peak:>6}"
        )
    return "\n".join(lines)
