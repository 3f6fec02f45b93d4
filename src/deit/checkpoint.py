"""Checkpoints: the ``Checkpoint`` record, its atomic writes, and rebuilding a model from it.

Everything we write loads with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, never pickled objects. Reading any
weight file, safely, is ``deit.weights``; its names are handed on here too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deit.files import atomic_path
from deit.weights import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    fetch_weights,
    is_deit_checkpoint,
    is_url,
    load_checkpoint,
    read_state_dict,
    weights_of,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "DataSpec",
    "ModelSpec",
    "fetch_weights",
    "is_deit_checkpoint",
    "is_url",
    "load_checkpoint",
    "model_from_checkpoint",
    "read_state_dict",
    "save_checkpoint",
    "weights_of",
]

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from deit.data import DatasetInfo


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def model_from_checkpoint(state: dict[str, Any], *, use_ema: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild the model a ``deit train`` checkpoint was written from, with its weights (or their EMA)."""
    return Checkpoint.from_state(state).build_model(use_ema=use_ema, **overrides)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: ``create_model``'s arguments."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int | None  # used by transformers (ours and timm's); CNNs take any size
    options: dict[str, Any] = field(default_factory=dict)  # drop_path_rate, attn_impl, eval_output, ...

    def build(self, **overrides: Any) -> nn.Module:
        from deit.models import create_model

        return create_model(
            self.name,
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            img_size=self.img_size,
            **{**self.options, **overrides},
        )


@dataclass(frozen=True)
class DataSpec:
    """What the model was trained on and expects: the data set, its classes, normalisation and input size."""

    dataset: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int


@dataclass
class Checkpoint:
    """A ``deit train`` checkpoint: the weights, what they are, and where the run that wrote them was.

    On disk it is a dict of plain values (``state_dict``), which loads with
    ``weights_only=True``. A file holds everything to evaluate or export the
    model; one written during training (``resumable``) also holds what continues
    its run exactly. Files from earlier versions lack some of the training
    fields, which then take their defaults.
    """

    model: dict[str, torch.Tensor]
    model_spec: ModelSpec
    data: DataSpec
    model_ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None  # None: weights only (an export, or a file from elsewhere)
    scaler: dict[str, Any] | None = None
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimizer steps completed in the epoch in progress
    best_acc1: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    meters: list[dict[str, Any]] = field(default_factory=list)  # every process's loss sums, in rank order
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config, as written to config.yaml
    teacher_cache: dict[str, torch.Tensor] | None = None  # logits and filled flags of a teacher cache

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """Read a file ``deit train`` (or ``deit export`` to safetensors) wrote; anything else is refused."""
        return cls.from_state(load_checkpoint(path), path)

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str | os.PathLike = "this file") -> Checkpoint:
        if not is_deit_checkpoint(state):
            raise CheckpointError(
                f"{source} was not written by `deit train`, so it does not say which model it holds; "
                "name the architecture too (for example --teacher-model resnet18 --teacher-path FILE)"
            )
        missing = [key for key in ("model", "model_spec", "data") if key not in state]
        if missing:
            raise CheckpointError(f"{source} is a deit checkpoint without {', '.join(missing)}: it is damaged")
        spec, data = state["model_spec"], state["data"]
        return cls(
            model=weights_of(state, source),
            model_spec=ModelSpec(
                spec["name"], spec["num_classes"], spec["in_chans"], spec.get("img_size"), dict(spec.get("options", {}))
            ),
            data=DataSpec(
                data["dataset"],
                tuple(data["class_names"]),
                tuple(data["mean"]),
                tuple(data["std"]),
                int(data["input_size"]),
            ),
            model_ema=state.get("model_ema"),
            optimizer=state.get("optimizer"),
            scaler=state.get("scaler"),
            epoch=int(state.get("epoch", 0)),
            epoch_step=int(state.get("epoch_step", 0)),
            best_acc1=float(state.get("best_acc1", 0.0)),
            history=list(state.get("history", [])),
            meters=list(state.get("meters") or []),
            world_size=int(state.get("world_size", 1)),
            config=dict(state.get("config", {})),
            teacher_cache=state.get("teacher_cache"),
        )

    def state_dict(self) -> dict[str, Any]:
        """The on-disk form: tensors, numbers, strings, lists and dicts only."""
        state = {"format": FORMAT, "version": FORMAT_VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            state[item.name] = asdict(value) if item.name in ("model_spec", "data") else value
        state["data"] = {**state["data"], "class_names": list(self.data.class_names)}
        state["data"].update(mean=list(self.data.mean), std=list(self.data.std))
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash leaves the previous file or this one, never a torn file."""
        return save_checkpoint(self.state_dict(), path)

    def build_model(self, *, use_ema: bool = False, **overrides: Any) -> nn.Module:
        """The model with its weights (or their EMA); ``overrides`` change options such as ``eval_output``."""
        method = self.config.get("pretrain", {}).get("method")
        if method:
            raise CheckpointError(
                f"this checkpoint holds a self-supervised pretraining run ({method}): a backbone with its projection "
                "heads, not a classifier. Score its features with `deit linear-probe --checkpoint FILE`, or start "
                "a classifier from it with `deit train --init FILE`"
            )
        if use_ema and self.model_ema is None:
            raise CheckpointError("this checkpoint holds no EMA weights: train with --model-ema-decay to keep them")
        model = self.model_spec.build(**overrides)
        model.load_state_dict(self.model_ema if use_ema else self.model)
        return model

    def eval_data(
        self, *, dataset: str | None = None, data_path: str | None = None, batch_size: int = 256
    ) -> tuple[DataLoader, DatasetInfo]:
        """The validation loader of the data set it was trained on (or ``dataset``), with its own input size.

        Another data set must have the same classes, in the same order.
        """
        from deit.data import build_eval_data

        saved_path = self.config.get("data", {}).get("path")
        loader, info = build_eval_data(
            dataset or self.data.dataset,
            data_path if data_path is not None else saved_path,
            batch_size=batch_size,
            input_size=self.data.input_size,
            in_chans=self.model_spec.in_chans,
        )
        if tuple(info.class_names) != self.data.class_names:
            raise CheckpointError(
                f"the checkpoint was trained on {len(self.data.class_names)} classes "
                f"{list(self.data.class_names)[:5]}..., the data set has {info.num_classes} "
                f"{list(info.class_names)[:5]}..."
            )
        return loader, info
