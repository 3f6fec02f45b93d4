"""How fast can a frozen CNN teacher run its forward pass on CPU? One teacher, several ways of running it.

The paper-recipe step of pipeline_speed.py spends about a third of its time in the ResNet-18 teacher
(benchmarks/results/profile_step.md). The teacher is frozen, so more can be done to it than to the student:
keep its weights in bf16, fold its batch norms into its convolutions, or let inductor compile it with its
weights as constants ("freezing"), which is what `deit train --compile` does to a teacher. Each way is
timed on the same random batch, interleaved in one process.

    python benchmarks/teacher_forward.py                  # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.fx.experimental.optimization as fx_optimization
from distillation_table import commit
from torch import nn


def interleaved_milliseconds(
    calls: dict[str, Callable[[], torch.Tensor]], rounds: int, per_round: int = 5
) -> dict[str, float]:
    """Median milliseconds of one call of each, over ``rounds`` rounds that take every call in turn.

    This machine's speed drifts by tens of percent within a minute; timing the ways one after another would
    measure the drift, so each round times every way in turn: a warm-up call, then ``per_round`` timed ones.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()  # warm-up: caches, allocator, oneDNN's primitive for this shape
            for _ in range(per_round):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(seconds) for name, seconds in times.items()}


def ways(model: nn.Module, images: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> a call of the teacher's forward, one per way of running it."""
    channels_last = images.contiguous(memory_format=torch.channels_last)

    def variant(*, bf16_weights: bool = False, folded: bool = False) -> nn.Module:
        """A channels-last copy of the teacher, with bf16 weights and its batch norms folded in if asked."""
        copied = fx_optimization.fuse(model) if folded else copy.deepcopy(model)  # fuse: BN into the conv
        copied = copied.to(torch.bfloat16) if bf16_weights else copied
        return copied.to(memory_format=torch.channels_last)

    def plain(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: module(x)

    def autocast(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(x)

        return call

    compiled = torch.compile(variant(), options={"freezing": True})
    return {
        "fp32": plain(model, images),
        "fp32, channels-last": plain(variant(), channels_last),
        "bf16 autocast": autocast(model, images),
        "bf16 autocast, channels-last (deit train's default)": autocast(variant(), channels_last),
        "bf16 weights, channels-last": plain(variant(bf16_weights=True), channels_last.bfloat16()),
        "bf16 weights, batch norm folded, channels-last": plain(
            variant(bf16_weights=True, folded=True), channels_last.bfloat16()
        ),
        "bf16 autocast, channels-last, compiled with freezing (--compile)": autocast(compiled, channels_last),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm CNN (pipeline_speed.py's teacher by default)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=28)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of 5 timed calls of every way")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/teacher_forward.md"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, in_chans=args.in_chans).eval().requires_grad_(False)
    images = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size)
    with torch.no_grad():
        calls = ways(model, images)
        started = time.perf_counter()
        calls["bf16 autocast, channels-last, compiled with freezing (--compile)"]()
        compile_seconds = time.perf_counter() - started
        results = interleaved_milliseconds(calls, args.rounds)
    baseline = results["bf16 autocast, channels-last (deit train's default)"]
    lines = [
        f"# The frozen teacher's forward pass: {args.model}, batch {args.batch_size} at {args.input_size} px",
        "",
        f"Command: `{' '.join(['python benchmarks/teacher_forward.py', *argv])}`",
        "",
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, measured at commit {commit()}. Median "
        f"milliseconds of a forward pass over {args.rounds} rounds that time every way 5 times in turn (the "
        f"machine's speed drifts); compiling took {compile_seconds:.0f} s (once).",
        "",
        "| teacher run as | ms per batch | × deit train's default |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.1f} | {baseline / ms:.2f} |" for name, ms in results.items()),
    ]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
