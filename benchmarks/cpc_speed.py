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
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

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


def count_denormals(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    magnitude = tensor.detach().float().abs()
    return int(((magnitude != 0) & (magnitude < TINY)).sum())


class OperatorAudit(TorchDispatchMode):
    """Every operator of a step (the backward's too): its calls, its seconds, and the denormals among its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list] = defaultdict(lambda: [0, 0.0, 0, 0])  # calls, seconds, denormals, values

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [value for value in args if isinstance(value, torch.Tensor)]
        start = time.perf_counter()
        output = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        shapes = " ".join("x".join(map(str, value.shape)) + f":{str(value.dtype)[6:]}" for value in inputs)
        record = self.records[f"{func.__name__}({shapes})"]
        record[0] += 1
        record[1] += seconds
        record[2] += sum(count_denormals(value) for value in inputs)
        record[3] += sum(value.numel() for value in inputs if value.is_floating_point())
        return output


def train_step(method, optimizer, images, precision) -> None:
    """One step of the run: forward and loss under its autocast, backward, AdamW."""
    with precision.autocast():
        loss = method(images)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def audit_step(method, optimizer, images, precision) -> OperatorAudit:
    audit = OperatorAudit()
    with audit:
        train_step(method, optimizer, images, precision)
    return audit


def denormal_gradients(method: torch.nn.Module) -> tuple[int, int]:
    grads = [parameter.grad for parameter in method.parameters() if parameter.grad is not None]
    return sum(count_denormals(grad) for grad in grads), sum(grad.numel() for grad in grads)


def time_steps(method, optimizer, images, precision, steps: int) -> float:
    for _ in range(2):
        train_step(method, optimizer, images, precision)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(method, optimizer, images, precision)
    return steps * len(images) / (time.perf_counter() - start)


def top_operators(method, optimizer, images, precision, count: int = 6) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step(method, optimizer, images, precision)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:count]
    return ", ".join(f"{event.key} {event.self_cpu_time_total / 1e3:.0f} ms" for event in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/self_supervised/pretrain/cpc/seed0/checkpoint.pth")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch's threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
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

    print("\nThe operators whose time grows most from fresh to trained weights (one step each, denormals kept):\n")
    audits = {}
    for trained in (False, True):
        method = build_cpc(checkpoint, trained=trained).train()
        optimizer = torch.optim.AdamW(method.parameters(), lr=1e-6)
        time_steps(method, optimizer, images, precision, 1)
        audits[trained] = audit_step(method, optimizer, images, precision).records
    grown = sorted(audits[True], key=lambda key: audits[True][key][1] - audits[False].get(key, [0, 0.0])[1])
    print("| operator (inputs) | calls | ms fresh | ms trained | denormal share of inputs, trained |")
    print("|---|---:|---:|---:|---:|")
    for key in reversed(grown[-8:]):
        calls, seconds, denormals, values = audits[True][key]
        fresh = audits[False].get(key, [0, 0.0])[1]
        print(f"| {key} | {calls} | {fresh * 1e3:.1f} | {seconds * 1e3:.1f} | {denormals / max(values, 1):.2%} |")


if __name__ == "__main__":
    main()
