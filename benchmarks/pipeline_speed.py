"""Distillation training speed on Fashion-MNIST: the official code's pipeline against ours, side by side.

Reference, built the way the official DeiT code trains: timm's distilled ViT,
per-image transforms on PIL images in a DataLoader, the teacher's fp32
forward on every batch, an fp32 student. With the paper's recipe, it uses
timm's ``create_transform``. For inputs of 32 px or less, the official code
swaps the random resized crop for a padded random crop, and so does the
reference. RandAugment ``rand-m9-mstd0.5-inc1`` and Random Erasing 0.25 run
per image. Mixup 0.8 and CutMix 1.0 from timm run on the batch, and
stochastic depth is 0.1. The only patch is the one that lets timm's
Posterize run on Pillow 13.

Ours: ``deit train``'s own loop with its defaults for the ``fashion_mnist``
preset: bf16 autocast where native, explicit attention, a channels-last
teacher, whole-batch augmentation on the device, and (light recipe only,
since the teacher must see every mixed batch otherwise) the teacher cache.

Both train the same student (width 128, depth 6, 4 heads, 7 px patches), with
the same ResNet-18 teacher, batch, optimizer, schedule and hard distillation.
Each comparison is a block, one per (recipe, data source):

- recipes: light (pad-crop and flip) and paper (above);
- sources: the in-memory Fashion-MNIST arrays, and the same images as an
  ImageFolder of PNG files. Ours decodes the folder once; the reference reads
  each file with PIL, in a DataLoader.

Within a block the pipelines are interleaved (median images/s over repeated
windows), so they see the same machine. Then each row runs alone in a
subprocess for its peak resident memory (main process and loader workers).
Last come whole training runs at equal epochs, for accuracy and wall time.

    python benchmarks/pipeline_speed.py                 # about 50 minutes on 2 cores
    python benchmarks/pipeline_speed.py --blocks paper/memory --epochs 0 --steps 10 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from distillation_table import commit
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from deit.config import TrainConfig, load_config, with_overrides
from deit.data.augment import guard_posterize
from deit.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from deit.engine import train_steps
from deit.optim import WarmupCosine
from deit.run import build_run
from deit.training import fit

BATCH = 128
MEAN, STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class Recipe:
    rand_augment: str | None
    random_erasing: float
    mixup: float
    cutmix: float
    drop_path: float


RECIPES = {
    "light": Recipe(None, 0.0, 0.0, 0.0, 0.0),
    "paper": Recipe("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1),
}
BLOCKS = ("light/memory", "paper/memory", "paper/folder", "light/folder")


# --- the data as files ----------------------------------------------------------------------------------------


def png_folder(work: Path) -> Path:
    """Fashion-MNIST written once as ``train/<class>/*.png`` and ``val/<class>/*.png`` under ``work``."""
    root = work / "fashion_mnist_png"
    if (root / "complete").is_file():
        return root
    train, val = load_fashion_mnist(None, False)
    for split, data in (("train", train), ("val", val)):
        for index, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
            folder = root / split / FASHION_MNIST_CLASSES[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{index:05d}.png")
    (root / "complete").write_text("")
    return root


def folder_order_teacher(teacher: Path, folder: Path, work: Path) -> tuple[Path, dict]:
    """The teacher with its classes in the folder's order: a checkpoint file, and its weights.

    An image folder numbers its classes alphabetically ("Ankle boot" first), Fashion-MNIST by its own list
    ("T-shirt/top" first), and `deit train` refuses a teacher whose classes come in another order. Permuting
    the classifier's rows (and the checkpoint's class names) gives the same teacher, answering in the
    folder's order, for both pipelines.
    """
    from deit.checkpoint import load_checkpoint

    state = load_checkpoint(teacher)
    names = sorted(path.name for path in (folder / "train").iterdir() if path.is_dir())
    order = [[name.replace("/", "-") for name in FASHION_MNIST_CLASSES].index(name) for name in names]
    weights = dict(state["model"])
    weights["fc.weight"], weights["fc.bias"] = weights["fc.weight"][order], weights["fc.bias"][order]
    state = {**state, "model": weights, "data": {**state["data"], "class_names": names, "dataset": "imagefolder"}}
    path = work / "teacher_folder_order.pth"
    torch.save(state, path)
    return path, weights


# --- the reference pipeline -----------------------------------------------------------------------------------


class PilFashionMnist(Dataset):
    """Fashion-MNIST as torchvision serves it: one PIL image per item, transformed in the loader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index, 0].numpy(), mode="L")), int(self.labels[index])


def gray_loader(path: str) -> Image.Image:
    with open(path, "rb") as file:
        return Image.open(file).convert("L")


def reference_transform(recipe: Recipe) -> Callable:
    if recipe.rand_augment is None:
        return transforms.Compose(
            [transforms.RandomCrop(28, padding=3), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
             transforms.Normalize(MEAN, STD)]
        )  # fmt: skip
    transform = create_transform(
        28, is_training=True, auto_augment=recipe.rand_augment, interpolation="bicubic",
        re_prob=recipe.random_erasing, re_mode="pixel", re_count=1, mean=MEAN, std=STD,
    )  # fmt: skip
    transform.transforms[0] = transforms.RandomCrop(28, padding=4)  # the official code's crop at <= 32 px
    return guard_posterize(transform)


@dataclass
class Reference:
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    loader: DataLoader
    mixup: Mixup | None
    step: int = 0

    @classmethod
    def build(cls, teacher_state: dict, recipe: Recipe, folder: Path | None, workers: int, seed: int) -> Reference:
        torch.manual_seed(seed)
        student = timm.models.deit.VisionTransformerDistilled(
            img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4,
            drop_path_rate=recipe.drop_path,
        )  # fmt: skip
        student.set_distilled_training(True)  # return both heads' logits while training, as the official code
        teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
        teacher.load_state_dict(teacher_state)
        transform = reference_transform(recipe)
        if folder is None:
            train, _ = load_fashion_mnist(None, False)
            dataset: Dataset = PilFashionMnist(train.images, train.labels, transform)
        else:
            dataset = datasets.ImageFolder(str(folder / "train"), transform=transform, loader=gray_loader)
        loader = DataLoader(
            dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        mixup = None
        if recipe.mixup or recipe.cutmix:
            mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=0.1, num_classes=10)
        config = load_config("fashion_mnist").optim
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr * BATCH / 512, weight_decay=0.05)
        schedule = WarmupCosine.from_config(config, BATCH, len(loader))
        return cls(student, teacher.eval(), optimizer, schedule, loader, mixup)

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
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)  # soft targets, label smoothing folded in
            else:
                targets = F.one_hot(labels, 10).float() * 0.9 + 0.01  # label smoothing 0.1
            with torch.no_grad():
                teacher_labels = self.teacher(images).argmax(dim=-1)  # the teacher sees the mixed batch
            cls_logits, dist_logits = self.student(images)
            loss = 0.5 * torch.sum(-targets * F.log_softmax(cls_logits, dim=-1), dim=-1).mean()
            loss = loss + 0.5 * F.cross_entropy(dist_logits, teacher_labels)
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule(self.step)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    def close(self) -> None:
        self.loader = None  # persistent workers end with their loader

    def accuracy(self) -> float:
        _, test = load_fashion_mnist(None, False)
        images = (test.images.float() / 255 - MEAN[0]) / STD[0]
        self.student.eval()
        with torch.no_grad():
            logits = torch.cat([self.student(images[i : i + 1000]) for i in range(0, len(images), 1000)])
        return 100.0 * (logits.argmax(-1) == test.labels).float().mean().item()


# --- our pipeline ----------------------------------------------------------------------------------------------

# Config overrides that switch levers off, per recipe (the teacher cache needs the light recipe).
LEVERS = {
    "light": {
        "bf16 autocast": {"run.amp": "none"},
        "teacher cache": {"distill.teacher_cache_views": None},
        "teacher cache and whole-batch augmentation": {"distill.teacher_cache_views": None, "augment.batched": False},
    },
    "paper": {
        "bf16 autocast": {"run.amp": "none"},
        "whole-batch augmentation": {"augment.batched": False},
        "channels-last teacher": {"distill.teacher_channels_last": False},
    },
}
STREAMED = {"data.decode_budget_gb": 0.0, "data.num_workers": 2}  # each file read and decoded in a loader worker
FOLDER_LEVERS = {  # per recipe: the teacher cache (light recipe) needs the decoded images in memory
    "light": {"decode-once (and so the teacher cache)": {**STREAMED, "distill.teacher_cache_views": None}},
    "paper": {"decode-once": STREAMED},
}


def our_config(teacher: Path, recipe: str, folder: Path | None, epochs: int, seed: int, **overrides) -> TrainConfig:
    spec = RECIPES[recipe]
    values = {
        "distill.type": "hard",
        "distill.teacher_model": "resnet18",
        "distill.teacher_path": str(teacher),
        "distill.teacher_channels_last": True,
        "distill.teacher_cache_views": 2 if recipe == "light" else None,  # the teacher must see each mixed batch
        "augment.rand_augment": spec.rand_augment,
        "augment.random_erasing": spec.random_erasing,
        "augment.mixup": spec.mixup,
        "augment.cutmix": spec.cutmix,
        "model.drop_path": spec.drop_path,
        "optim.epochs": epochs,
        "optim.batch_size": BATCH,
        "run.seed": seed,
        "run.progress": False,
        "run.eval_teacher": False,
    }
    if folder is not None:
        values.update({"data.dataset": "imagefolder", "data.path": str(folder), "data.in_chans": 1,
                       "data.input_size": 28})  # fmt: skip
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

    def close(self) -> None:
        self.run = None


# --- the rows of a block ---------------------------------------------------------------------------------------


def block_rows(block: str, args, teacher: Path, state: dict) -> dict[str, Callable[[], Reference | Ours]]:
    """Name -> builder of every pipeline compared in ``block`` (``recipe/source``)."""
    recipe, source = block.split("/")
    folder = png_folder(args.work_dir) if source == "folder" else None
    if folder is not None:
        teacher, state = folder_order_teacher(teacher, folder, args.work_dir)
    rows: dict[str, Callable] = {
        f"reference, {w} loader workers": (lambda w=w: Reference.build(state, RECIPES[recipe], folder, w, 0))
        for w in args.reference_workers
    }
    rows["ours"] = lambda: Ours(our_config(teacher, recipe, folder, 1, 0))
    if source == "memory" and not args.no_compile:
        rows["ours + torch.compile"] = lambda: Ours(
            our_config(teacher, recipe, None, 1, 0, **{"run.compile": "inductor"})
        )
    levers = (LEVERS if source == "memory" else FOLDER_LEVERS)[recipe]
    for lever, off in levers.items():
        rows[f"ours without {lever}"] = lambda off=off: Ours(our_config(teacher, recipe, folder, 1, 0, **off))
    return rows


# --- measurements ----------------------------------------------------------------------------------------------


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


def measure_block(rows: dict[str, Callable], args) -> dict[str, dict]:
    """Build every row (timed), then interleave their windows; returns rates, build seconds and GFLOP per step."""
    pipelines, results = {}, {}
    for name, build in rows.items():
        start = time.perf_counter()
        pipelines[name] = build()
        results[name] = {"build_seconds": time.perf_counter() - start, "rates": []}
    for _ in range(args.repeats):
        for name, pipeline in pipelines.items():
            results[name]["rates"].append(images_per_second(pipeline, args.steps, args.warmup))
            print(f"  {name}: {results[name]['rates'][-1]:.0f} im/s", flush=True)
    for name, pipeline in pipelines.items():
        results[name]["gflop"] = step_gflop(pipeline)
        pipeline.close()
    return results


def peak_rss_mb(block: str, name: str, args) -> float:
    """Peak resident memory (MB) of one row run alone: its process plus its largest loader worker."""
    command = [sys.executable, __file__, "--rss-row", block, name, "--work-dir", str(args.work_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.teacher:
        command += ["--teacher", str(args.teacher)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(json.loads(output.strip().splitlines()[-1])["peak_rss_mb"])


def run_one_row(block: str, name: str, args) -> None:
    """The ``--rss-row`` child: build the row, train its warm-up and one window, print the peak RSS."""
    teacher = ensure_teacher(args.teacher, args.work_dir)
    pipeline = block_rows(block, args, teacher, teacher_weights(teacher))[name]()
    images_per_second(pipeline, args.steps, args.warmup)
    pipeline.close()
    del pipeline  # persistent loader workers exit here and count as children
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_mb": (own + workers) / 1024}))  # Linux reports kB


def whole_runs(recipe: str, teacher: Path, state: dict, epochs: int, seeds: list[int], workers: int) -> dict:
    """Test top-1 and wall time of whole runs at equal epochs, on the in-memory data: the reference and ours."""
    runs: dict[str, list[tuple[float, float]]] = {"reference": [], "ours": []}
    for seed in seeds:
        start = time.perf_counter()
        reference = Reference.build(state, RECIPES[recipe], None, workers, seed)
        reference.train_steps(epochs * len(reference.loader))
        runs["reference"].append((reference.accuracy(), time.perf_counter() - start))
        reference.close()
        start = time.perf_counter()
        result = fit(our_config(teacher, recipe, None, epochs, seed))
        runs["ours"].append((result.final["acc1"], time.perf_counter() - start))
        print(f"  {recipe}, seed {seed}: " + ", ".join(f"{n} {v[-1]}" for n, v in runs.items()), flush=True)
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


# --- the report ------------------------------------------------------------------------------------------------


def report(args, blocks: dict[str, dict], rss: dict, peaks: dict, runs: dict) -> str:
    lines = [
        "# Distillation training speed on Fashion-MNIST: the official pipeline against ours",
        "",
        f"Command: `{' '.join(['python benchmarks/pipeline_speed.py', *args.argv])}`",
        "",
        f"Measured at commit {args.measured_at}.",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"measured matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16 (2048² matmul).",
        f"Student: distilled ViT, width 128, depth 6, 4 heads, 7 px patches (1.2 M parameters); teacher: ResNet-18; "
        f"batch {BATCH}; hard distillation. Light recipe: pad-crop and flip. Paper recipe: RandAugment "
        f"{RECIPES['paper'].rand_augment}, Random Erasing 0.25, Mixup 0.8, CutMix 1.0, stochastic depth 0.1.",
        "",
        f"Throughput: the median of {args.repeats} windows of {args.steps} steps after {args.warmup} warm-up steps, "
        "the pipelines of a block interleaved. × reference: against the block's faster reference. Build: seconds to "
        "construct the pipeline (ours decodes an image folder here). Peak RSS: the row run alone, its process and "
        "largest loader worker. GFLOP / step: student forward and backward, teacher forward (torch's flop counter).",
    ]
    for block, results in blocks.items():
        medians = {name: statistics.median(result["rates"]) for name, result in results.items()}
        reference = max((name for name in results if name.startswith("reference")), key=medians.get)
        recipe, source = block.split("/")
        where = "in-memory arrays" if source == "memory" else "an ImageFolder of 60,000 PNG files"
        lines += [
            "",
            f"## {recipe.capitalize()} recipe, {where}",
            "",
            "| pipeline | images/s | spread (min–max) | × reference | build (s) | peak RSS (MB) | GFLOP / step "
            "| % of matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, result in results.items():
            fp32 = name.startswith("reference") or "without bf16" in name
            achieved = result["gflop"] * medians[name] / BATCH
            memory = rss.get(block, {}).get(name)
            lines.append(
                f"| {name} | {medians[name]:.0f} | {min(result['rates']):.0f}–{max(result['rates']):.0f} | "
                f"{medians[name] / medians[reference]:.2f} | {result['build_seconds']:.1f} | "
                f"{f'{memory:.0f}' if memory else 'not measured'} | {result['gflop']:.2f} | "
                f"{100 * achieved / peaks['fp32' if fp32 else 'bf16']:.1f} |"
            )
    for recipe, results in runs.items():
        lines += ["", f"## Whole runs, {recipe} recipe: {args.epochs} epochs on all 60,000 images (in memory)", ""]
        lines += ["| pipeline | test top-1 (%) | per seed | minutes per run |", "|---|---:|---|---:|"]
        for name, values in results.items():
            accuracies = [a for a, _ in values]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            minutes = statistics.mean(t for _, t in values) / 60
            per_seed = ", ".join(f"{a:.2f}" for a in accuracies)
            lines.append(f"| {name} | {statistics.mean(accuracies):.2f} ± {spread:.2f} | {per_seed} | {minutes:.1f} |")
        ratio = statistics.mean(t for _, t in results["reference"]) / statistics.mean(t for _, t in results["ours"])
        lines += ["", f"Whole-run speed-up (reference wall time / ours): {ratio:.2f}×."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, help="a deit train checkpoint of resnet18 on Fashion-MNIST")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/pipeline_speed"))
    parser.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the whole runs (0: skip them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (30 s to compile)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory runs (one subprocess a row)")
    parser.add_argument("--rss-row", nargs=2, metavar=("BLOCK", "ROW"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/pipeline_speed.md"))
    args = parser.parse_args()
    args.argv, args.measured_at = sys.argv[1:], commit()  # at the start: commits made while it runs do not count
    if args.rss_row:
        run_one_row(*args.rss_row, args)
        return
    teacher = ensure_teacher(args.teacher, args.work_dir)
    state = teacher_weights(teacher)
    peaks = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    blocks, rss, runs = {}, {}, {}

    def write() -> str:  # after every stage, so that an interrupted run keeps what it measured
        text = report(args, blocks, rss, peaks, runs)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(
            json.dumps({"blocks": blocks, "rss_mb": rss, "peaks": peaks, "runs": runs}, indent=1)
        )
        return text

    for block in args.blocks:
        print(f"{block}: throughput (images/s)", flush=True)
        blocks[block] = measure_block(block_rows(block, args, teacher, state), args)
        write()
    for block in [] if args.no_rss else args.blocks:
        for name in blocks[block]:
            rss.setdefault(block, {})[name] = peak_rss_mb(block, name, args)
            print(f"  {block}, {name}: peak RSS {rss[block][name]:.0f} MB", flush=True)
        write()
    for recipe in sorted({block.split("/")[0] for block in args.blocks}) if args.epochs else []:
        runs[recipe] = whole_runs(recipe, teacher, state, args.epochs, args.seeds, max(args.reference_workers))
        write()
    print(write())


if __name__ == "__main__":
    main()
