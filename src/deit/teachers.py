"""The teacher: build it, load it, freeze it, and feed it the student's batch.

A teacher comes from one of three places:

* a ``deit train`` checkpoint (``teacher_path`` alone): it knows its model,
  classes and input normalisation;
* a weights file from elsewhere (``teacher_path`` plus ``teacher_model``): an
  official DeiT ``{'model': ...}`` file or a timm state dict;
* a timm name with ``teacher_pretrained=True``, for users who are online.

``Teacher`` wraps the network so that it takes the student's normalised batch
and converts it (channel count, normalisation) to what the teacher was trained
on. It is always in eval mode and never builds a graph.

The training step asks every kind of teacher the same question (``TeacherLike``):
the logits for these images, which are these training-set indices. The online
``Teacher`` looks at the images; a ``TeacherCache`` and stored pseudo-labels
look the answer up by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from deit.checkpoint import Checkpoint, is_deit_checkpoint, load_checkpoint, read_state_dict
from deit.config import ConfigError
from deit.errors import DeitError
from deit.models import create_model, is_deit_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's convert("L")


class TeacherLike(Protocol):
    """What the training step calls: logits (or log-probabilities) for a batch of training images."""

    name: str

    def __call__(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor: ...


class TeacherMismatchError(DeitError, ValueError):
    """The teacher cannot teach this data set (class count, class names or channels differ)."""


@dataclass(frozen=True)
class InputSpec:
    """What a network expects as input: channels and per-channel normalisation."""

    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Teacher(nn.Module):
    """A frozen classifier that takes the student's input batch and returns logits."""

    def __init__(self, model: nn.Module, student_input: InputSpec, teacher_input: InputSpec, name: str = "teacher"):
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.student_input = student_input
        self.teacher_input = teacher_input
        channels = {student_input.in_chans, teacher_input.in_chans}
        if len(channels) == 2 and channels != {1, 3}:
            raise TeacherMismatchError(
                f"the teacher takes {teacher_input.in_chans}-channel images and the student "
                f"{student_input.in_chans}-channel ones; only 1 <-> 3 channels can be converted"
            )
        self.needs_conversion = student_input != teacher_input
        self.memory_format = torch.contiguous_format
        self.register_buffer("student_mean", _channel_vector(student_input.mean), persistent=False)
        self.register_buffer("student_std", _channel_vector(student_input.std), persistent=False)
        self.register_buffer("teacher_mean", _channel_vector(teacher_input.mean), persistent=False)
        self.register_buffer("teacher_std", _channel_vector(teacher_input.std), persistent=False)
        self.register_buffer("luma", _channel_vector(_LUMA), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        # the teacher stays in eval mode (batch norm statistics, no dropout) whatever the caller does
        return super().train(False)

    def to_teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the student's normalisation, convert channels, apply the teacher's."""
        if not self.needs_conversion:
            return x
        pixels = x * self.student_std + self.student_mean  # (B, C_student, H, W) in [0, 1]
        if pixels.shape[1] == 1 and self.teacher_input.in_chans == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif pixels.shape[1] == 3 and self.teacher_input.in_chans == 1:
            pixels = (pixels * self.luma).sum(dim=1, keepdim=True)
        return (pixels - self.teacher_mean) / self.teacher_std

    def channels_last(self) -> Teacher:
        """Keep a CNN teacher's weights and inputs in channels-last format, which oneDNN and cuDNN run faster."""
        self.model.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits on ``x``; ``indices`` (the images' training-set positions) are not needed."""
        return self.model(self.to_teacher_input(x).contiguous(memory_format=self.memory_format))


def _channel_vector(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def _expand_stats(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return (sum(values) / len(values),) * in_chans


def timm_input_spec(model: nn.Module, in_chans: int) -> InputSpec:
    """The normalisation a timm model's pretrained weights expect (ImageNet's when it does not say)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = _expand_stats(cfg.get("mean", IMAGENET_MEAN), in_chans)
    std = _expand_stats(cfg.get("std", IMAGENET_STD), in_chans)
    return InputSpec(in_chans, mean, std)


def _classifier_out_features(model_name: str, state: dict[str, torch.Tensor]) -> int | None:
    """How many classes the weights in ``state`` predict, read off the classifier's weight."""
    if is_deit_model(model_name):
        key = "head.weight"
    else:
        import timm

        classifier = timm.get_pretrained_cfg_value(model_name, "classifier") or "head"
        key = f"{classifier}.weight"
    weight = state.get(key)
    return int(weight.shape[0]) if weight is not None else None


def _first_conv_in_chans(model_name: str, state: dict[str, torch.Tensor]) -> int:
    if is_deit_model(model_name):
        key = "patch_embed.proj.weight"
    else:
        import timm

        key = f"{timm.get_pretrained_cfg_value(model_name, 'first_conv') or 'conv1'}.weight"
    weight = state.get(key)
    return int(weight.shape[1]) if weight is not None and weight.ndim == 4 else 3


def load_teacher_network(
    teacher_model: str | None, teacher_path: str | None, pretrained: bool = False
) -> tuple[nn.Module, InputSpec, list[str] | None, str]:
    """The teacher network with its input spec, class names (when known) and a display name."""
    if teacher_path:
        state = load_checkpoint(teacher_path)
        if is_deit_checkpoint(state):
            saved = Checkpoint.from_state(state, teacher_path)
            spec = InputSpec(saved.model_spec.in_chans, saved.data.mean, saved.data.std)
            return saved.build_model(), spec, list(saved.data.class_names), f"{saved.model_spec.name} ({teacher_path})"
        if not teacher_model:
            raise TeacherMismatchError(
                f"{teacher_path} was not written by `deit train`, so it does not say which network it holds; "
                "name it with --teacher-model (for example regnety_160 or resnet18)"
            )
        weights = read_state_dict(teacher_path)
        num_classes = _classifier_out_features(teacher_model, weights) or 1000
        in_chans = _first_conv_in_chans(teacher_model, weights)
        model = create_model(teacher_model, num_classes=num_classes, in_chans=in_chans)
        model.load_state_dict(weights)
        return model, timm_input_spec(model, in_chans), None, f"{teacher_model} ({teacher_path})"
    if not teacher_model:
        raise ConfigError(
            "distillation needs a teacher: give --teacher-path, or --teacher-model with --teacher-pretrained"
        )
    if not pretrained:
        raise ConfigError(
            f"teacher {teacher_model!r} has no weights: a randomly initialised teacher teaches nothing. "
            "Give --teacher-path FILE (for example a checkpoint from `deit train --model resnet18`), "
            "or --teacher-pretrained to download timm's weights"
        )
    model = create_model(teacher_model, pretrained=True)
    return model, timm_input_spec(model, 3), None, f"{teacher_model} (pretrained)"


def build_teacher(
    teacher_model: str | None,
    teacher_path: str | None,
    *,
    student_input: InputSpec,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    input_size: int,
    pretrained: bool = False,
) -> Teacher:
    """Load, freeze and check a teacher before training starts.

    Raises ``TeacherMismatchError`` when the teacher's classes (count or names)
    differ from the data set's, naming both.
    """
    network, teacher_input, teacher_classes, name = load_teacher_network(teacher_model, teacher_path, pretrained)
    teacher = Teacher(network, student_input, teacher_input, name=name)
    probe = torch.zeros(2, student_input.in_chans, input_size, input_size)
    teacher_num_classes = teacher(probe).shape[-1]
    if teacher_num_classes != num_classes:
        raise TeacherMismatchError(
            f"teacher {name} predicts {teacher_num_classes} classes but the data set has {num_classes}; "
            "train or fine-tune a teacher on this data set's classes"
        )
    if teacher_classes is not None and class_names is not None and list(teacher_classes) != list(class_names):
        differing = [(i, t, s) for i, (t, s) in enumerate(zip(teacher_classes, class_names, strict=True)) if t != s]
        raise TeacherMismatchError(
            f"teacher {name} was trained on other classes, or in another order, than this data set: "
            f"first difference at index {differing[0][0]}: teacher {differing[0][1]!r}, data set {differing[0][2]!r}"
        )
    return teacher
