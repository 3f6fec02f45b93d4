"""Distillation training speed on Fashion-MNIST: the official code's pipeline against ours, side by side.

Reference, built the way the official DeiT code trains: timm's distilled ViT,
torchvision per-image transforms on PIL images in a DataLoader, the teacher's
fp32 forward on every batch, an fp32 student. Ours: our DeiT with bf16
autocast and explicit attention, whole-batch augmentation on the device, a
channels-last teacher, the teacher cache, and optionally torch.compile. Same
student architecture (width 128, depth 6, 4 heads, 7 px patches), same
ResNet-18 teacher, batch, optimizer, schedule, data and augmentation policy
(pad-crop and flip), hard distillation.

It prints and writes a Markdown report: the median images/s over repeated
windows (interleaved, so both pipelines see the same machine), their spread,
each lever switched off on its own, the fraction of the measured matmul peak,
and the test accuracy and wall time of whole training runs at equal epochs.

    python benchmarks/pipeline_speed.py                # about 20 minutes on 2 cores
    python benchmarks/pipeline_speed.py --epochs 1 --seeds 0 --steps 10 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from deit.config import TrainConfig, load_config, with_overrides
from deit.data.datasets import load_fashion_mnist
from deit.engine import train_steps
from deit.optim import WarmupCosine
from deit.run import build_run
from deit.training import fit

BATCH = 128
MEAN, STD = (0.2860,), (0.3530,)


# --- the reference pipeline -------------------------------------------------------------------------------


class PilFashionMnist(Dataset):
    """Fashion-MNIST as torchvision serves it: one PIL image per item, transformed in the loader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index, 0].numpy(), mode="L")), int(self.labels[index])


@dataclass
class Reference:
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    loader: DataLoader
    step: int = 0

    @classmethod
    def build(cls, teacher_state: dict, epochs: int, workers: int, seed: int) -> Reference:
        torch.manual_seed(seed)
        student = timm.models.deit.VisionTransformerDistilled(
            img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4
        )
        student.set_distilled_training(True)  # return both heads' logits while training, as the official code
        teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
        teacher.load_state_dict(teacher_state)
        train, _ = load_fashion_mnist(None, False)
        policy = transforms.Compose(
            [transforms.RandomCrop(28, padding=3), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
             transforms.Normalize(MEAN, STD)]
        )  # fmt: skip
        loader = DataLoader(
            PilFashionMnist(train.images, train.labels, policy), batch_size=BATCH, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        config = load_config("fashion_mnist").optim
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr * BATCH / 512, weight_decay=0.05)
        return cls(student, teacher.eval(), optimizer, WarmupCosine.from_config(config, BATCH, len(loader)), loader)

    def train_steps(self, count: int) -> None:
        """``count`` steps from the start of an epoch, as many epochs as that takes."""
        self.student.train()
        batches = iter(self.loader)
        for _ in range(count):
            try:
                images, labels = next(batches)
            except StopIteration:  # the next epoch: a new shuffled order
                batches = iter(self.loader)
                images, labels = next(batches)
            with torch.no_grad():
                teacher_labels = self.teacher(images).argmax(dim=-1)
            cls_logits, dist_logits = self.student(images)
            loss = 0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=0.1)
            loss = loss + 0.5 * F.cross_entropy(dist_logits, teacher_labels)
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule(self.step)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    def accuracy(self) -> float:
        _, test = load_fashion_mnist(None, False)
        images = (test.images.float() / 255 - MEAN[0]) / STD[0]
        self.student.eval()
        with torch.no_grad():
            logits = torch.cat([self.student(images[i : i + 1000]) for i in range(0, len(images), 1000)])
        return 100.0 * (logits.argmax(-1) == test.labels).float().mean().item()


# --- our pipeline ------------------------------------------------------------------------------------------

# Config overrides that switch levers off. The teacher levers only matter while the teacher runs, and the
# cache needs whole-batch augmentation: compare those rows with the one "without teacher cache".
LEVERS = {
    "bf16 autocast": {"run.amp": "none"},
    "teacher cache": {"distill.teacher_cache_views": None},
    "teacher cache and channels-last teacher": {
        "distill.teacher_cache_views": None,
        "distill.teacher_channels_last": False,
    },
    "teacher cache and whole-batch augmentation": {"distill.teacher_cache_views": None, "augment.batched": False},
}


def our_config(teacher_path: Path, epochs: int, seed: int, **overrides) -> TrainConfig:
    values = {
        "distill.type": "hard",
        "distill.teacher_model": "resnet18",
        "distill.teacher_path": str(teacher_path),
        "distill.teacher_channels_last": True,
        "distill.teacher_cache_views": 2,
        "optim.epochs": epochs,
        "optim.batch_size": BATCH,
        "run.seed": seed,
        "run.progress": False,
        "run.eval_teacher": False,
    }
    return with_overrides(load_config("fashion_mnist"), {**values, **overrides})


class Ours:
    def __init__(self, config: TrainConfig) -> None:
        self.run = build_run(config)

    def train_steps(self, count: int) -> None:
        run = self.run
        run.data.train_sampler.set_epoch(0)
        if hasattr(run.teacher, "set_epoch"):
            run.teacher.set_epoch(0)
        for _ in train_steps(run.step_parts(), run.data.train_loader, first_step=0, steps=count):
            pass


# --- measurements ------------------------------------------------------------------------------------------


def peak_gflops(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def step_gflop(pipeline: Reference | Ours) -> float:
    """Floating-point work of one training step (student forward + backward, teacher forward), in GFLOP."""
    with FlopCounterMode(display=False) as counter:
        pipeline.train_steps(1)
    return counter.get_total_flops() / 1e9


def images_per_second(pipeline: Reference | Ours, steps: int, warmup: int) -> float:
    pipeline.train_steps(warmup)  # also fills the teacher cache for these batches: the steady state from epoch 2
    start = time.perf_counter()
    pipeline.train_steps(steps)
    return steps * BATCH / (time.perf_counter() - start)


def interleaved(builders: dict[str, Callable[[], Reference | Ours]], steps: int, repeats: int, warmup: int):
    pipelines = {name: build() for name, build in builders.items()}
    rates = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, pipeline in pipelines.items():
            rates[name].append(images_per_second(pipeline, steps, warmup))
            print(f"  {name}: {rates[name][-1]:.0f} im/s", flush=True)
    return pipelines, rates


def whole_runs(teacher_path: Path, teacher_state: dict, epochs: int, seeds: list[int], workers: int) -> dict:
    """Test top-1 and wall time of whole runs: the reference, ours, and ours with the exact online teacher."""
    runs = {"reference": [], "ours": [], "ours, online teacher (no cache)": []}
    for seed in seeds:
        start = time.perf_counter()
        reference = Reference.build(teacher_state, epochs, workers, seed)
        reference.train_steps(epochs * len(reference.loader))
        runs["reference"].append((reference.accuracy(), time.perf_counter() - start))
        for name, overrides in (("ours", {}), ("ours, online teacher (no cache)", LEVERS["teacher cache"])):
            start = time.perf_counter()
            result = fit(our_config(teacher_path, epochs, seed, **overrides))
            runs[name].append((result.final["acc1"], time.perf_counter() - start))
        print(f"  seed {seed}: " + ", ".join(f"{name} {values[-1]}" for name, values in runs.items()), flush=True)
    return runs


def teacher_weights(path: Path) -> dict:
    from deit.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if state.get("model_spec", {}).get("name") != "resnet18":
        raise SystemExit(f"{path} is not a deit train checkpoint of resnet18")
    return state["model"]


def ensure_teacher(path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    out = work / "teacher"
    if not (out / "checkpoint.pth").exists():
        teacher = with_overrides(
            load_config("fashion_mnist_teacher"), {"optim.epochs": 2, "run.output_dir": str(out), "run.progress": False}
        )
        fit(teacher)
    return out / "checkpoint.pth"


def report(args, rates: dict, gflop: dict, peaks: dict, runs: dict | None) -> str:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    references = [name for name in rates if name.startswith("reference")]
    reference = max(references, key=medians.get)
    lines = [
        "# Distillation training speed on Fashion-MNIST: the official pipeline against ours",
        "",
        f"Command: `{' '.join(['python benchmarks/pipeline_speed.py', *args.argv])}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"measured matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16 (2048² matmul).",
        f"Student: distilled ViT, width 128, depth 6, 4 heads, 7 px patches (1.2 M parameters); teacher: ResNet-18; "
        f"batch {BATCH}; hard distillation; pad-crop + flip.",
        "",
        f"## Throughput: median of {args.repeats} windows of {args.steps} steps, interleaved",
        "",
        "| pipeline | images/s | spread (min–max) | × reference | GFLOP / step | % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values in rates.items():
        peak = peaks["fp32"] if name.startswith("reference") or "without bf16" in name else peaks["bf16"]
        achieved = gflop[name] * medians[name] / BATCH
        lines.append(
            f"| {name} | {medians[name]:.0f} | {min(values):.0f}–{max(values):.0f} | "
            f"{medians[name] / medians[reference]:.2f} | {gflop[name]:.2f} | {100 * achieved / peak:.1f} |"
        )
    lines += [
        "",
        f"× reference: against the faster reference ({reference}). Ours with the teacher cache is measured in its "
        "steady state (from epoch 2 on the teacher is not run); the whole runs below include the epochs that fill it. "
        "GFLOP / step counts the student's forward and backward and the teacher's forward (torch's flop counter).",
    ]
    if runs:
        lines += ["", f"## Accuracy and wall time of whole runs: {args.epochs} epochs on all 60,000 images", ""]
        lines += ["| pipeline | test top-1 (%) | per seed | minutes per run |", "|---|---:|---|---:|"]
        for name, results in runs.items():
            accuracies = [a for a, _ in results]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            minutes = statistics.mean(t for _, t in results) / 60
            per_seed = ", ".join(f"{a:.2f}" for a in accuracies)
            lines.append(f"| {name} | {statistics.mean(accuracies):.2f} ± {spread:.2f} | {per_seed} | {minutes:.1f} |")
        ratio = statistics.mean(t for _, t in runs["reference"]) / statistics.mean(t for _, t in runs["ours"])
        lines += ["", f"Whole-run speed-up (reference wall time / ours): {ratio:.2f}×."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, help="a deit train checkpoint of resnet18 on Fashion-MNIST")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/pipeline_speed"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the whole runs (0: skip them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (30 s to compile)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/pipeline_speed.md"))
    args = parser.parse_args()
    args.argv = [a for a in __import__("sys").argv[1:]]
    torch.set_num_threads(torch.get_num_threads())
    teacher_path = ensure_teacher(args.teacher, args.work_dir)
    state = teacher_weights(teacher_path)
    peaks = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    builders: dict[str, Callable] = {
        f"reference, {w} loader workers": (lambda w=w: Reference.build(state, 1, w, 0)) for w in args.reference_workers
    }
    builders["ours"] = lambda: Ours(our_config(teacher_path, 1, 0))
    if not args.no_compile:
        builders["ours + torch.compile"] = lambda: Ours(our_config(teacher_path, 1, 0, **{"run.compile": "inductor"}))
    for lever, off in LEVERS.items():
        builders[f"ours without {lever}"] = lambda off=off: Ours(our_config(teacher_path, 1, 0, **off))
    print("throughput (images/s):", flush=True)
    pipelines, rates = interleaved(builders, args.steps, args.repeats, args.warmup)
    gflop = {name: step_gflop(pipeline) for name, pipeline in pipelines.items()}
    del pipelines
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(args, rates, gflop, peaks, None))  # kept even if the whole runs fail
    runs = (
        whole_runs(teacher_path, state, args.epochs, args.seeds, max(args.reference_workers)) if args.epochs else None
    )
    text = report(args, rates, gflop, peaks, runs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(
        json.dumps({"rates": rates, "gflop": gflop, "peaks": peaks, "runs": runs}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
