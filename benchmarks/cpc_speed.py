"""Why CPC's pretraining slows down as it learns: a step with fresh weights against a step with trained ones.

The seed-0 CPC run of ``self_supervised.py`` started at 545 images/s and ended
at 368, with nothing else running, while every other method kept its pace.
The slowdown follows its loss down, so the suspect is the arithmetic of a
trained network: fp32 values so small (denormal, below 1.2e-38) that x86
handles them in microcode. This script times the training step of the CPC
method (forward, backward, AdamW) on one batch of Fashion-MNIST under bf16
autocast, as the run does:

- with the weights it starts from (fresh) and with those of a finished run;
- with denormals kept, and flushed to zero (``torch.set_flush_denormal``);

and for each it counts the denormal values among the step's gradients and
names the operators that take the time.

    python benchmarks/cpc_speed.py --checkpoint runs/self_supervised/pretrain/cpc/seed0/checkpoint.pth
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from deit.checkpoint import Checkpoint
from deit.config import PretrainConfig
from deit.data.datasets import load_fashion_mnist
from deit.engine import Precision
from deit.ssl.backbone import build_backbone
from deit.ssl.pretrain import MethodSetup, build_method

TINY = torch.finfo(torch.float32).tiny


def build_cpc(checkpoint: Checkpoint, *, trained: bool) -> torch.nn.Module:
    spec = checkpoint.model_spec
    backbone = build_backbone(spec.name, in_chans=spec.in_chans, img_size=checkpoint.data.input_size, **spec.options)
    pretrain = checkpoint.config.get("pretrain", {})
    config = PretrainConfig(method="cpc", cpc_patch=pretrain.get("cpc_patch"), cpc_steps=pretrain.get("cpc_steps", 2))
    method = build_method(backbone, config, MethodSetup(total_steps=1, image_size=checkpoint.data.input_size))
    if trained:
        weights = {key: value for key, value in checkpoint.model.items() if not key.startswith("backbone.model.fc.")}
        missing = method.load_state_dict(weights, strict=False).missing_keys  # the classifier, unused by CPC
        assert all(key.startswith("backbone.model.fc.") for key in missing), missing
    return method


def denormal_gradients(method: torch.nn.Module) -> tuple[int, int]:
    counts = [0, 0]
    for parameter in method.parameters():
        if parameter.grad is not None:
            grad = parameter.grad.float()
            counts[0] += int(((grad != 0) & (grad.abs() < TINY)).sum())
            counts[1] += grad.numel()
    return counts[0], counts[1]


def time_steps(method, optimizer, images, precision, steps: int) -> float:
    def step() -> None:
        with precision.autocast():
            loss = method(images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(images) / (time.perf_counter() - start)


def top_operators(method, optimizer, images, precision, count: int = 6) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with precision.autocast():
            loss = method(images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:count]
    return ", ".join(f"{event.key} {event.self_cpu_time_total / 1e3:.0f} ms" for event in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/self_supervised/pretrain/cpc/seed0/checkpoint.pth")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    checkpoint = Checkpoint.load(args.checkpoint)
    train, _ = load_fashion_mnist(None, download=False)
    mean = torch.tensor(checkpoint.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(checkpoint.data.std).view(1, -1, 1, 1)
    images = (train.images[: args.batch_size].float() / 255 - mean) / std
    precision = Precision.resolve("auto", torch.device("cpu"))
    print(f"CPC step, batch {args.batch_size}, {precision.describe()}, {torch.get_num_threads()} threads")
    print("| weights | denormals | images/s | denormal gradients | slowest operators (one step, self time) |")
    print("|---|---|---:|---:|---|")
    for trained in (False, True):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            method = build_cpc(checkpoint, trained=trained).train()
            # the run's moments hold no denormal (checked), so a fresh AdamW; its tiny lr barely moves the weights
            optimizer = torch.optim.AdamW(method.parameters(), lr=1e-6)
            rate = time_steps(method, optimizer, images, precision, args.steps)
            denormals, total = denormal_gradients(method)
            operators = top_operators(method, optimizer, images, precision)
            print(f"| {'trained' if trained else 'fresh'} | {'flushed' if flush else 'kept'} | {rate:.0f} "
                  f"| {denormals} of {total} | {operators} |")  # fmt: skip
    torch.set_flush_denormal(False)


if __name__ == "__main__":
    main()
