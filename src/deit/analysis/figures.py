"""Figures as PNG files, drawn on matplotlib ``Figure`` objects (no pyplot state, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def matrix_figure(matrix: torch.Tensor, rows: Sequence[str], columns: Sequence[str], title: str, fmt: str) -> Figure:
    """A heat map with each cell's value written in it."""
    size = max(4.0, 0.5 * len(columns) + 2)
    figure = Figure(figsize=(size, size * 0.85))
    axes = figure.add_subplot()
    axes.imshow(matrix.float().numpy(), cmap="viridis")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    axes.set_title(title)
    low, high = matrix.float().min().item(), matrix.float().max().item()
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j].item()
            color = "black" if value - low > 0.6 * (high - low) else "white"  # dark text on viridis' light end
            axes.text(j, i, format(value, fmt), ha="center", va="center", color=color)
    return figure


def cosine_figure(values: Sequence[float], labels: Sequence[str]) -> Figure:
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    axes.plot(range(len(values)), values, marker="o")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_ylim(-1.05, 1.05)
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_ylabel("cosine(class token, distillation token)")
    axes.set_title("The two tokens through the network")
    return figure


def attention_figure(images: torch.Tensor, maps: dict[str, torch.Tensor]) -> Figure:
    """One column per image: the image, then each map upsampled and laid over it."""
    rows = ["image", *maps]
    count = images.shape[0]
    figure = Figure(figsize=(1.6 * count, 1.6 * len(rows)))
    grid = figure.subplots(len(rows), count, squeeze=False)
    shown = images - images.amin(dim=(1, 2, 3), keepdim=True)
    shown = shown / shown.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    size = images.shape[-1]
    for column in range(count):
        picture = shown[column].permute(1, 2, 0).squeeze(-1).numpy()
        for row, name in enumerate(rows):
            axes = grid[row][column]
            axes.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            if name != "image":
                heat = F.interpolate(maps[name][column][None, None], size=(size, size), mode="bilinear")
                axes.imshow(heat[0, 0].numpy(), cmap="inferno", alpha=0.55)
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(name.replace("_", " "), fontsize=8)
    return figure


def curves_figure(runs: dict[str, list[dict]]) -> Figure:
    """Training loss, learning rate and validation top-1 of each head per epoch, one line per run."""
    figure = Figure(figsize=(15, 4))
    loss_axes, lr_axes, acc_axes = figure.subplots(1, 3)
    for name, records in runs.items():
        epochs = [record["epoch"] for record in records]
        loss_axes.plot(epochs, [record["train"]["loss"] for record in records], marker=".", label=name)
        lr_axes.plot(epochs, [record["train"]["lr"] for record in records], marker=".", label=name)
        evaluated = [record for record in records if "val" in record]  # runs with --eval-interval skip epochs
        heads = [key for key in ("acc1", "cls_acc1", "dist_acc1") if evaluated and key in evaluated[-1]["val"]]
        for key in heads:
            style = {"acc1": "-", "cls_acc1": "--", "dist_acc1": ":"}[key]
            label = f"{name} {key.removesuffix('acc1').rstrip('_') or 'prediction'}"
            acc_axes.plot(
                [record["epoch"] for record in evaluated],
                [record["val"][key] for record in evaluated],
                style,
                marker=".",
                label=label,
            )
    for axes, title in (
        (loss_axes, "train loss"),
        (lr_axes, "learning rate (end of epoch)"),
        (acc_axes, "val top-1 (%)"),
    ):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.legend(fontsize=7)
    return figure
