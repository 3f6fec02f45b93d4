"""Checkpoints: atomic writes, safe reads, and rebuilding a model from a file.

Everything we write loads with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, never pickled objects. Reads never
fall back to full unpickling, since that can run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "deit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can use, with the reason."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are fsynced, and the
    file is renamed over ``path``: a crash at any moment leaves either the old
    checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)  # mkstemp creates 0600; a checkpoint is as readable as any file we write
        with os.fdopen(handle, "wb") as tmp:
            torch.save(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint or weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"model": load_file(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"{path} cannot be read as a weights-only checkpoint ({error.__class__.__name__}). "
            "It is either damaged or holds pickled Python objects, which we refuse to load because "
            "unpickling can run arbitrary code. Re-save just its state dict with torch.save(model.state_dict(), ...)."
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    return state


def is_deit_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("format") == FORMAT


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a file: ours, an official DeiT ``{'model': ...}``, or a bare state dict."""
    state = load_checkpoint(path)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # weights saved from a DistributedDataParallel or torch.compile wrapper
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def model_from_checkpoint(state: dict[str, Any], *, use_ema: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild the model a ``deit train`` checkpoint was written from, with its weights (or their EMA)."""
    from deit.models import create_model

    if not is_deit_checkpoint(state):
        raise CheckpointError(
            "this file was not written by `deit train`, so it does not say which model it holds; "
            "name the architecture too (for example --teacher-model resnet18 --teacher-path FILE)"
        )
    spec = state["model_spec"]
    model = create_model(
        spec["name"],
        num_classes=spec["num_classes"],
        in_chans=spec["in_chans"],
        img_size=spec.get("img_size"),
        **{**spec.get("options", {}), **overrides},
    )
    if use_ema and state.get("model_ema") is None:
        raise CheckpointError("this checkpoint holds no EMA weights: train with --model-ema-decay to keep them")
    model.load_state_dict(state["model_ema"] if use_ema else state["model"])
    return model
