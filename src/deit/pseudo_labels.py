"""Pseudo-labels: a teacher's predictions on clean training images, stored once, looked up while training.

Noisy Student (Xie et al. 2020) labels the unlabelled images with a teacher
that sees them clean (no augmentation, no dropout), keeps the confident ones,
balances the classes, and trains a noised student on them. Here the stored
predictions take the place of the online teacher: ``PseudoLabelTeacher``
returns, for each image of a batch, the teacher's log-probabilities on that
image's clean version, so soft distillation learns the teacher's
distribution and hard distillation its decision (the argmax). The labelled
images keep their labels for the class head, as with an online teacher.

A pseudo-label file (safetensors) holds the teacher's probabilities on every
image of the training pool and the ``selection``: the pool indices the student
trains on, the labelled images once and the kept unlabelled images as often
as class balancing repeats them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deit.data.unlabeled import UNLABELED
from deit.errors import DeitError
from deit.files import atomic_path


class PseudoLabelError(DeitError, ValueError):
    """A pseudo-label file that does not fit the run's training pool."""


@dataclass(frozen=True)
class PseudoLabels:
    probs: torch.Tensor  # (pool images, classes): the teacher's probabilities on each clean image
    selection: torch.Tensor  # (images trained on,): pool indices, repeats allowed
    class_names: tuple[str, ...]
    teacher: str  # where the predictions come from, for the log
    pool: str  # fingerprint of the training pool they label (deit.data.unlabeled.pool_fingerprint)

    def save(self, path: str | Path) -> None:
        metadata = {"class_names": json.dumps(list(self.class_names)), "teacher": self.teacher, "pool": self.pool}
        with atomic_path(Path(path)) as temporary:
            tensors = {"probs": self.probs.float().contiguous(), "selection": self.selection.long().contiguous()}
            save_file(tensors, str(temporary), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> PseudoLabels:
        if not Path(path).is_file():
            raise PseudoLabelError(f"pseudo-label file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if {"probs", "selection"} - set(file.keys()) or {"class_names", "pool"} - set(metadata):
                    raise PseudoLabelError(
                        f"{path} is not a pseudo-label file from this version of deit (it needs probs, selection, "
                        "class names and the pool's fingerprint): make it with `deit pseudo-label`"
                    )
                probs, selection = file.get_tensor("probs"), file.get_tensor("selection")
        except SafetensorError as error:
            raise PseudoLabelError(f"{path} is not a pseudo-label file (unreadable as safetensors: {error})") from error
        class_names = tuple(json.loads(metadata["class_names"]))
        return cls(probs, selection, class_names, metadata.get("teacher", "?"), metadata["pool"])

    def check(self, class_names: tuple[str, ...]) -> None:
        """Refuse labels made for another data set (the pool itself is checked where it is built)."""
        if tuple(class_names) != self.class_names:
            raise PseudoLabelError(f"pseudo-labels are for classes {self.class_names}, the data has {class_names}")


class PseudoLabelTeacher(nn.Module):
    """A teacher that looks its answers up: the stored predictions for the selected pool's images."""

    def __init__(self, labels: PseudoLabels) -> None:
        super().__init__()
        self.name = f"pseudo-labels of {labels.teacher}"
        log_probs = labels.probs.clamp_min(1e-12).log()[labels.selection]
        self.register_buffer("log_probs", log_probs)

    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if indices is None:
            raise ValueError("pseudo-labels are looked up by training-image index; they cannot label other images")
        return self.log_probs[indices.to(self.log_probs.device)].to(images.device)


@torch.no_grad()
def predict_pool(
    teacher: nn.Module, pool: Dataset, *, batch_size: int, device: torch.device, num_workers: int = 0
) -> torch.Tensor:
    """The teacher's probabilities on every pool image, in order; ``pool`` carries the evaluation transform."""
    teacher.eval()
    loader = DataLoader(pool, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs = [teacher(images.to(device)).float().softmax(dim=-1).cpu() for images, _ in loader]
    return torch.cat(probs)


def select(
    probs: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.0, balance: bool = False, seed: int = 0
) -> torch.Tensor:
    """Pool indices to train on: every labelled image, and the unlabelled ones the teacher is sure enough of.

    ``threshold`` drops unlabelled images whose top probability is below it.
    ``balance`` gives every class the same number of unlabelled images (their
    mean count), as Noisy Student does: a class with more keeps its most
    confident ones, a class with fewer repeats its images (seeded).
    """
    labels = torch.as_tensor(labels)
    confidence, predicted = probs.max(dim=-1)
    unlabeled = (labels == UNLABELED) & (confidence >= threshold)
    labeled = (labels != UNLABELED).nonzero().flatten()
    kept = unlabeled.nonzero().flatten()
    if balance and len(kept):
        generator = torch.Generator().manual_seed(seed)
        per_class = len(kept) // probs.shape[1]
        balanced = []
        for cls in range(probs.shape[1]):
            members = kept[predicted[kept] == cls]
            if len(members) == 0:
                continue  # a class the teacher never predicts cannot be balanced up
            members = members[confidence[members].argsort(descending=True)]
            if len(members) < per_class:  # all of them, then seeded repeats up to the count
                extra = members[torch.randint(len(members), (per_class - len(members),), generator=generator)]
                members = torch.cat([members, extra])
            balanced.append(members[:per_class])
        kept = torch.cat(balanced) if balanced else kept[:0]
    return torch.cat([labeled, kept])
