"""Which predictors agree: the ground truth, the teacher, each head, the fusions, an undistilled student.

The paper's disagreement table compares a convnet teacher, a DeiT trained
without distillation, and the class head, distillation head and fused
prediction of a distilled DeiT: the distillation head agrees more with the
teacher than the class head does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from deit.engine import Precision, head_logits


@torch.no_grad()
def collect_predictions(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    precision: Precision,
    others: dict[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Predicted classes of every head of ``model`` and of each model in ``others``, plus ``labels``."""
    others = {name: other.eval() for name, other in (others or {}).items()}
    model.eval()
    collected: dict[str, list[torch.Tensor]] = {"labels": []}
    for images, labels in loader:
        images = images.to(device)
        collected["labels"].append(labels)
        with precision.autocast():
            outputs = head_logits(model, images)
            outputs.update({name: other(images) for name, other in others.items()})
        for name, logits in outputs.items():
            collected.setdefault(name, []).append(logits.argmax(dim=-1).cpu())
    return {name: torch.cat(parts) for name, parts in collected.items()}


def agreement_matrix(predictions: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(len(names), len(names)): the fraction of images on which each pair predicts the same class."""
    stacked = torch.stack([predictions[name] for name in names])  # (P, N)
    return (stacked[:, None, :] == stacked[None, :, :]).float().mean(dim=-1)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) counts."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
