"""The linear probe: how well a linear classifier separates the classes in a frozen backbone's features.

Every image's features (unaugmented, centre view) are computed once. A
multinomial logistic regression is then fitted to the training features. It
runs full batch by L-BFGS, on standardised features, with an L2 penalty of
||W||² / (2N): scikit-learn's default, C = 1. Nothing is tuned on the
validation set. The same features also give the kNN top-1 of the pretraining
monitor. A score means little alone, so the probe is run on two baselines
too: the same architecture at random initialisation, and the raw pixels.

    deit linear-probe --checkpoint runs/simclr/checkpoint.pth --label-fraction 0.1
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deit.data import build_probe_data
from deit.distributed import resolve_device
from deit.engine import Precision
from deit.rng import seed_everything
from deit.ssl.knn import knn_predict
from deit.ssl.transfer import describe, load_backbone

log = logging.getLogger("deit")

Encoder = Callable[[torch.Tensor], torch.Tensor]  # normalised images (B, C, H, W) -> features (B, D)


@dataclass(frozen=True)
class ProbeScore:
    """Top-1 (%) of a linear classifier and of the kNN monitor on one kind of features."""

    features: str  # what was probed: the checkpoint, random init, raw pixels
    dim: int
    linear_acc1: float
    knn_acc1: float


@dataclass(frozen=True)
class Features:
    train: torch.Tensor  # (N, D)
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor


@torch.no_grad()
def extract(encode: Encoder, loader: DataLoader, *, device: torch.device, precision: Precision) -> tuple:
    """(features, labels) of every image of ``loader``, features in fp32 on ``device``."""
    chunks, labels = [], []
    for images, targets in loader:
        with precision.autocast():
            chunks.append(encode(images.to(device)).float())
        labels.append(targets.to(device))
    return torch.cat(chunks), torch.cat(labels)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, max_iter: int = 500) -> nn.Module:
    """Multinomial logistic regression on standardised ``features``, by full-batch L-BFGS, penalty C = 1."""
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)  # constant pixels (borders) stay 0
    standard = (features - mean) / std
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")  # fmt: skip
    penalty = 1.0 / (2 * len(features))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(standard), labels, reduction="sum") / len(features)
        loss = loss + penalty * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return nn.Sequential(_Standardise(mean, std), linear)


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def score(name: str, features: Features, num_classes: int, *, k: int = 20, temperature: float = 0.07) -> ProbeScore:
    """The linear probe's and the kNN's top-1 (%) on ``features``."""
    with torch.enable_grad():
        classifier = fit_logistic(features.train, features.train_labels, num_classes)
    linear = (classifier(features.val).argmax(dim=1) == features.val_labels).float().mean().item()
    bank, queries = F.normalize(features.train, dim=1), F.normalize(features.val, dim=1)
    knn = knn_predict(bank, features.train_labels, queries, num_classes=num_classes, k=k, temperature=temperature)
    knn_acc = (knn == features.val_labels).float().mean().item()
    return ProbeScore(name, features.train.shape[1], 100 * linear, 100 * knn_acc)


def with_channels(encode: nn.Module, in_chans: int) -> Encoder:
    """``encode`` fed images of any channel count: gray repeated to colour, colour averaged to gray."""

    def run(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != in_chans:
            gray = images.mean(dim=1, keepdim=True)
            images = gray.expand(-1, in_chans, -1, -1) if in_chans > 1 else gray
        return encode(images)

    return run


def probe_checkpoint(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_path: str | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    batch_size: int = 512,
    device: str = "cpu",
    amp: str = "none",
    baselines: bool = True,
) -> list[ProbeScore]:
    """The linear probe of the backbone in ``path`` on ``dataset`` (default: its own), then of the baselines."""
    backbone, checkpoint = load_backbone(path)
    run_device = resolve_device(device)
    precision = Precision.resolve(amp, run_device)
    dataset = dataset or checkpoint.data.dataset
    if data_path is None and dataset == checkpoint.data.dataset:
        data_path = checkpoint.config.get("data", {}).get("path")
    train_loader, val_loader, info = build_probe_data(
        dataset, data_path, batch_size=batch_size, input_size=checkpoint.data.input_size,
        in_chans=checkpoint.model_spec.in_chans, label_fraction=label_fraction, seed=seed,
    )  # fmt: skip
    log.info("linear probe of %s on %s: %d labelled training images, %d validation images",
             describe(checkpoint), info.name, len(train_loader.dataset), len(val_loader.dataset))  # fmt: skip
    encoders: list[tuple[str, Encoder]] = [(f"{checkpoint.model_spec.name} ({path})", backbone)]
    if baselines:
        seed_everything(seed)  # the random init the baseline draws
        random_init, _ = load_backbone(path, random_init=True)
        encoders += [(f"{checkpoint.model_spec.name}, random init", random_init), ("raw pixels", nn.Flatten())]
    scores = []
    for name, encoder in encoders:
        if isinstance(encoder, nn.Module):
            encoder.to(run_device).eval()
        encode = with_channels(encoder, checkpoint.model_spec.in_chans) if name != "raw pixels" else encoder
        train = extract(encode, train_loader, device=run_device, precision=precision)
        val = extract(encode, val_loader, device=run_device, precision=precision)
        scores.append(score(name, Features(*train, *val), info.num_classes))
        log.info("%s: linear %.2f%%, kNN %.2f%%", name, scores[-1].linear_acc1, scores[-1].knn_acc1)
    return scores


def format_scores(scores: list[ProbeScore]) -> str:
    width = max(len(s.features) for s in scores)
    lines = [f"{'features':<{width}} {'dim':>6} {'linear':>7} {'kNN':>7}"]
    lines += [f"{s.features:<{width}} {s.dim:>6} {s.linear_acc1:7.2f} {s.knn_acc1:7.2f}" for s in scores]
    return "\n".join(lines)
