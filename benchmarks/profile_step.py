"""Where a training step's time goes: the paper-recipe distillation step of pipeline_speed.py, part by part.

The step is taken apart and each part timed on its own, in the order the step
runs it (synchronised on GPU):

- loader: the next batch from the training loader;
- augmentation: whole-batch crop, flip, RandAugment, Random Erasing;
- Mixup / CutMix;
- teacher: its forward pass;
- student: its forward pass and the loss;
- backward;
- optimizer: AdamW's step and zeroing the gradients;
- evaluation: one pass over the validation set, spread over the steps of an
  epoch.

Then ``deit benchmark --train --peak`` on DeiT-S at 224 px in bf16 and fp32
(and compiled in bf16) sets a large model's step against the measured matmul
peak, and torch's profiler splits the bf16 step by operator: the matrix
products, at what rate they run, and what else takes the time.

    python benchmarks/profile_step.py                 # 3-8 minutes on 2 cores (compiling DeiT-S included)
    python benchmarks/profile_step.py --steps 5 --no-deit-small   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from distillation_table import commit
from pipeline_speed import BATCH, ensure_teacher, our_config
from torch.utils.flop_counter import FlopCounterMode

from deit.benchmark import _train_step, matmul_peak_gflops, measure_throughput
from deit.engine import Precision, _optimizer_step, evaluate
from deit.models import create_model
from deit.run import build_run

# DeiT-S's operators by kind, for the split of its step (self time: a kernel's own, not its callers'). On CPU
# AdamW runs plain per-tensor ops, so its time is found by the optimizer step that calls them instead.
OPERATOR_KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                        "aten::convolution_backward"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "LayerNorm, GELU, softmax and their gradients": ("layer_norm", "gelu", "softmax"),
}  # fmt: skip
OPTIMIZER = "AdamW (every op its step calls)"
PARTS = ("loader", "augmentation", "Mixup / CutMix", "teacher", "student forward + loss", "backward", "optimizer")


class Stopwatch:
    """Seconds between laps, synchronised with the device first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.laps, self.last = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now


def profile_steps(steps: int, warmup: int, teacher: Path) -> tuple[dict[str, list[float]], float, int]:
    """Seconds of each part for ``steps`` steps (after ``warmup``), the evaluation's seconds, and steps per epoch."""
    run = build_run(our_config(teacher, "paper", None, 1, 0))
    parts, device = run.step_parts(), run.device
    run.data.train_sampler.set_epoch(0)
    batches = iter(run.data.train_loader)
    times: dict[str, list[float]] = defaultdict(list)
    parts.model.train()
    for step in range(warmup + steps):
        watch = Stopwatch(device)
        batch = next(batches).to(device)
        watch.lap("loader")
        images = parts.augment(batch.images, batch.seeds)
        watch.lap("augmentation")
        images, labels = parts.mixup(images, batch.labels) if parts.mixup is not None else (images, batch.labels)
        watch.lap("Mixup / CutMix")
        with parts.precision.autocast():
            teacher_logits = parts.teacher(images, batch.indices)
        watch.lap("teacher")
        with parts.precision.autocast():
            loss = parts.criterion.components(parts.model(images), labels, teacher_logits)["loss"]
        watch.lap("student forward + loss")
        loss.backward()
        watch.lap("backward")
        _optimizer_step(parts.model, parts.optimizer, parts.lr_at(step), parts.scaler, parts.clip_grad)
        watch.lap("optimizer")
        if step >= warmup:
            for name, seconds in watch.laps.items():
                times[name].append(seconds)
    started = time.perf_counter()
    evaluate(run.model, run.data.val_loader, device=device, precision=run.precision)
    return times, time.perf_counter() - started, run.steps_per_epoch


def _called_by_the_optimizer(event) -> bool:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def deit_small_split(dtype: str, steps: int = 3) -> tuple[dict[str, float], float]:
    """Self milliseconds per DeiT-S training step (batch 32, 224 px) by operator kind, and the matmuls' GFLOP/s."""
    model = create_model("deit_small_distilled_patch16_224", attn_impl="math").train()
    images, labels = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
    precision = Precision.resolve({"fp32": "none"}.get(dtype, dtype), torch.device("cpu"))
    step = _train_step(model, None, precision, images, labels)
    step()  # warm-up: the first step allocates AdamW's state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    kinds: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if _called_by_the_optimizer(event):
            kind = OPTIMIZER
        else:
            kind = next((k for k, names in OPERATOR_KINDS.items() if any(n in event.name for n in names)), "other")
        kinds[kind] += event.self_cpu_time_total / 1000 / steps
    with FlopCounterMode(display=False) as counter:
        step()
    matmul_rate = counter.get_total_flops() / 1e9 / (kinds["matrix products"] / 1000)
    return dict(kinds), matmul_rate


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="a deit train checkpoint of resnet18 (default: pipeline_speed's)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/pipeline_speed"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-deit-small", action="store_true", help="skip DeiT-S against the matmul peak")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/profile_step.md"))
    args = parser.parse_args(argv)
    measured_at = commit()
    teacher = ensure_teacher(args.teacher, args.work_dir)
    times, evaluation, steps_per_epoch = profile_steps(args.steps, args.warmup, teacher)
    per_step = {name: statistics.median(times[name]) * 1000 for name in PARTS}
    per_step["evaluation (per step of an epoch)"] = evaluation * 1000 / steps_per_epoch
    total = sum(per_step.values())
    lines = [
        "# Where a training step's time goes",
        "",
        f"Command: `{' '.join(['python benchmarks/profile_step.py', *argv])}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"The paper-recipe row of pipeline_speed.py: `deit_nano_distilled_patch7_28`, batch {BATCH}, "
        "online ResNet-18 teacher, hard distillation, RandAugment rand-m9-mstd0.5-inc1, Random Erasing 0.25, "
        "Mixup 0.8, CutMix 1.0, stochastic depth 0.1, bf16 where native. "
        f"Median milliseconds per step over {args.steps} steps after {args.warmup}. Measured at commit {measured_at}.",
        "",
        "| part | ms per step | share |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.1f} | {100 * ms / total:.1f} % |" for name, ms in per_step.items()),
        f"| **total** | **{total:.1f}** | {BATCH * 1000 / total:.0f} images/s |",
    ]
    rows, split = [], {}
    if not args.no_deit_small:
        for dtype, compiled in (("bf16", False), ("fp32", False), ("bf16", True)):
            rows.append(measure_throughput("deit_small_distilled_patch16_224", batch_size=32, input_size=224,
                                           dtype=dtype, train=True, attn_impl="math", peak=True, warmup=1, iters=3,
                                           repeats=3, compile=compiled).to_dict())  # fmt: skip
        peak = matmul_peak_gflops("bf16", torch.device("cpu"))
        kinds, matmul_rate = deit_small_split("bf16")
        split = {"ms_per_step": kinds, "matmul_gflops": matmul_rate, "bf16_peak_gflops": peak}
        step_ms = sum(kinds.values())
        lines += [
            "",
            "## DeiT-S against the matmul peak",
            "",
            "`deit benchmark --model deit_small_distilled_patch16_224 --batch-size 32 --dtype bf16 fp32 --train "
            "--attn-impl math --peak` (and `--compile`): a training step (forward, backward, AdamW) at 224 px.",
            "",
            "| dtype | compiled | images/s | GFLOP / image | % of the matmul peak |",
            "|---|---|---:|---:|---:|",
            *(f"| {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['images_per_sec']:.1f} | "
              f"{r['gflop_per_image']:.1f} | {100 * r['peak_share']:.0f} |" for r in rows),
            "",
            f"Where the bf16 step's time goes (torch's profiler, self time per step, {step_ms:.0f} ms with the "
            f"profiler's own overhead). The matrix products run at {matmul_rate:.0f} GFLOP/s, "
            f"{100 * matmul_rate / peak:.0f} % of the {peak:.0f} GFLOP/s that one 2048² bf16 matmul reaches here; "
            "the other rows are memory-bound work that the peak does not count.",
            "",
            "| operators | ms per step | share |",
            "|---|---:|---:|",
            *(f"| {kind} | {ms:.0f} | {100 * ms / step_ms:.0f} % |"
              for kind, ms in sorted(kinds.items(), key=lambda item: -item[1])),
        ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(
        json.dumps(
            {"commit": measured_at, "per_step_ms": per_step, "deit_small": rows, "deit_small_split": split}, indent=1
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
