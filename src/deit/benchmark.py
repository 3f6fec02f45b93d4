"""``deit benchmark``: images per second and peak memory of a model, as the paper's model table reports them.

The protocol follows the paper's: a fixed batch (or the largest power of two
that fits), a few warm-up iterations, then timed iterations, synchronised on
GPU; the median of several timed repeats is reported. Inference runs in eval
mode under ``torch.inference_mode``; a training step is forward, backward and
an AdamW step (for a distilled DeiT, both heads' losses); with a teacher, the
step also runs the frozen teacher, and its share of the step is reported.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deit.data.batch import Batch
from deit.distributed import resolve_device
from deit.engine import Precision, StepParts, train_steps
from deit.errors import DeitError
from deit.losses import DistillationLoss
from deit.models import VisionTransformer, create_model, is_deit_model
from deit.run import attention_kernel

DTYPES = ("fp32", "bf16", "fp16")
CPU_AUTO_BATCH_LIMIT = 256  # on CPU nothing runs out of memory first: "auto" stops here


class BenchmarkError(DeitError, ValueError):
    """A benchmark that cannot run as asked, with the reason."""


@dataclass(frozen=True)
class Throughput:
    model: str
    params_m: float  # parameters, millions
    resolution: int
    batch: int
    dtype: str
    compiled: bool
    mode: str  # "inference", "train" or "train + teacher NAME"
    images_per_sec: float
    peak_memory_mb: float  # GPU: peak allocated by torch; CPU: the process's peak resident memory so far
    teacher_share: float | None = None  # fraction of a distillation step spent in the teacher
    attention: str | None = None  # our DeiT models' attention kernel: sdpa or math
    gflop_per_image: float | None = None  # counted by torch's flop counter on one step (with --peak)
    peak_share: float | None = None  # achieved GFLOP/s over the measured matmul peak of the dtype (with --peak)

    def to_dict(self) -> dict:
        return asdict(self)


def _precision(dtype: str, device: torch.device) -> Precision:
    if dtype not in DTYPES:
        raise BenchmarkError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    if dtype == "fp16" and device.type == "cpu":
        raise BenchmarkError("fp16 autocast is not a fast path on CPU (no fp16 matmul units): use bf16 or fp32")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BenchmarkError(f"{torch.cuda.get_device_name(device)} has no bf16 support: use fp16 or fp32")
    return Precision.resolve({"fp32": "none"}.get(dtype, dtype), device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None], device: torch.device, warmup: int, iters: int, repeats: int) -> float:
    """Median seconds per call over ``repeats`` timings of ``iters`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            run()
        _synchronize(device)
        timings.append((time.perf_counter() - start) / iters)
    return statistics.median(timings)


def _train_step(model: nn.Module, teacher: nn.Module | None, precision: Precision, images, labels) -> Callable:
    """One call, one optimizer step of ``engine.train_steps`` (the training loop itself) on a fixed batch."""
    criterion = DistillationLoss("hard" if teacher is not None else "none")  # hard: the paper's best
    parts = StepParts(
        model,
        criterion,
        torch.optim.AdamW(model.parameters(), lr=1e-4),
        lr_at=lambda step: 1e-4,
        device=images.device,
        precision=precision,
        teacher=(lambda batch, indices=None: teacher(batch)) if teacher is not None else None,
    )
    batch = Batch(images, labels, torch.arange(len(images)))
    steps = train_steps(parts, itertools.repeat(batch), first_step=0, steps=2**62)
    return lambda: next(steps)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_throughput(
    name: str,
    *,
    batch_size: int,
    input_size: int,
    in_chans: int = 3,
    num_classes: int = 1000,
    dtype: str = "fp32",
    compile: bool = False,
    train: bool = False,
    teacher: str | None = None,
    device: str = "auto",
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 3,
    attn_impl: str | None = None,
    peak: bool = False,
) -> Throughput:
    """Throughput of ``name`` (any deit or timm model) on random images of ``batch_size`` x ``input_size``².

    ``attn_impl`` picks our DeiT models' attention kernel (default: as `deit train`'s
    ``auto`` would, for this dtype and device). With ``peak``, the
    step's floating-point work is counted and set against a measured matmul
    peak of the same dtype on the same device.
    """
    torch_device = resolve_device(device)
    precision = _precision(dtype, torch_device)
    kernel = attention_kernel(attn_impl or "auto", precision)  # as `deit train` would pick it
    options = {"attn_impl": kernel} if is_deit_model(name) else {}
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=input_size, **options)
    model = model.to(torch_device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    teacher_model = None
    if teacher is not None:
        teacher_model = create_model(teacher, num_classes=num_classes, in_chans=in_chans, img_size=input_size)
        teacher_model = teacher_model.to(torch_device).eval().requires_grad_(False)
    runnable = torch.compile(model) if compile else model
    images = torch.randn(batch_size, in_chans, input_size, input_size, device=torch_device)
    labels = torch.randint(0, num_classes, (batch_size,), device=torch_device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)

    model.train(train)
    seconds, share, step = _time_step(
        runnable, teacher_model, precision, images, labels, train=train,
        timed=lambda call: _timed(call, torch_device, warmup, iters, repeats),
    )  # fmt: skip
    mode = "inference" if not train else "train" if teacher is None else f"train + teacher {teacher}"
    memory = _peak_memory_mb(torch_device)
    gflop = peak_share = None
    if peak:
        gflop = _gflop_per_call(step) / batch_size
        peak_share = gflop * batch_size / seconds / matmul_peak_gflops(dtype, torch_device)
    attention = kernel if isinstance(model, VisionTransformer) else None
    return Throughput(
        name, params, input_size, batch_size, dtype, compile, mode, batch_size / seconds, memory, share, attention,
        gflop, peak_share,
    )  # fmt: skip


def _time_step(
    model: nn.Module,
    teacher: nn.Module | None,
    precision: Precision,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    train: bool,
    timed: Callable[[Callable[[], None]], float],
) -> tuple[float, float | None, Callable[[], None]]:
    """Seconds per call, the teacher's share and the timed call: an inference, a train step, or one with a teacher."""
    if not train:

        def infer() -> None:
            with torch.inference_mode(), precision.autocast():
                model(images)

        return timed(infer), None, infer
    step = _train_step(model, None, precision, images, labels)
    seconds = timed(step)
    if teacher is None:
        return seconds, None, step
    # timed after the student alone, to report the teacher's share
    with_teacher = _train_step(model, teacher, precision, images, labels)
    seconds_with_teacher = timed(with_teacher)
    return seconds_with_teacher, max(0.0, 1 - seconds / seconds_with_teacher), with_teacher


def _gflop_per_call(step: Callable[[], None]) -> float:
    """Floating-point work of one call of ``step`` as torch's FLOP counter counts it (matmuls, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(dtype: str, device: torch.device, size: int = 2048) -> float:
    """The best GFLOP/s of a square ``size`` matmul in ``dtype`` on ``device``: what a step's share is taken of."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = (torch.randn(size, size, device=device).to(torch_dtype) for _ in range(2))
    seconds = _timed(lambda: a @ b, device, warmup=2, iters=3, repeats=5)  # the median of 5: a noisy machine
    return 2 * size**3 / seconds / 1e9


def largest_batch(measure: Callable[[int], Throughput], device: torch.device, limit: int = 1024) -> Throughput:
    """Double the batch until it no longer fits (GPU) or reaches the CPU limit; the last result that ran."""
    limit = CPU_AUTO_BATCH_LIMIT if device.type == "cpu" else limit
    batch, best = 1, None
    while batch <= limit:
        try:
            best = measure(batch)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        batch *= 2
    if best is None:
        raise BenchmarkError("not even a batch of 1 fits in memory")
    return best
