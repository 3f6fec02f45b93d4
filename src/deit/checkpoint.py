"""Checkpoints: atomic writes, safe reads, and rebuilding a model from a file.

Everything we write loads with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, never pickled objects. Reads never
fall back to full unpickling, since that can run arbitrary code. A URL is
downloaded once into torch's hub cache and only used if its SHA-256 matches the
hash in its file name (``deit_tiny_patch16_224-a1311bcf.pth``, the official and
torchvision convention) or in a ``#sha256=<hex>`` suffix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deit.errors import DeitError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from deit.data import DatasetInfo

FORMAT = "deit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(DeitError, ValueError):
    """A file that is not a checkpoint we can use, with the reason."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over ``path``.

    A crash or an error at any moment leaves either the old file or the new
    one, never a torn file; on error the temporary file is removed and the
    error propagates (a full disk raises and keeps the previous file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp creates 0600; what we write is as readable as any other file
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


# a hash prefix in a file name: at least 8 hex digits between a dash and the extension
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")
_URL_SCHEMES = ("http://", "https://", "file://")


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(_URL_SCHEMES)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(url: str, *, progress: bool = True) -> Path:
    """The local copy of ``url`` in torch's hub cache, downloaded if needed; its SHA-256 is always checked."""
    address, _, fragment = url.partition("#")
    name = Path(urllib.parse.urlparse(address).path).name
    expected = fragment.removeprefix("sha256=").lower() if fragment.startswith("sha256=") else None
    if expected is None and (match := _NAME_HASH.search(name)):
        expected = match.group(1)
    if not expected or not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise CheckpointError(
            f"{url} carries no SHA-256 to check the download against: add #sha256=<hex digest> to the URL "
            "(or download it yourself and pass the file)"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(address, str(cached), hash_prefix=expected, progress=progress)
        except RuntimeError as error:  # torch.hub's hash mismatch; the partial file is already removed
            raise CheckpointError(f"{url}: {error}; the download was discarded") from error
    elif not _sha256(cached).startswith(expected):
        raise CheckpointError(
            f"{cached} (cached from {url}) does not match SHA-256 {expected}: delete it to download again"
        )
    return cached


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint or weights file (or a URL, hash-checked) without unpickling arbitrary objects."""
    path = fetch_weights(path) if is_url(path) else Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
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


def _load_safetensors(path: Path) -> dict[str, Any]:
    """Weights, plus the model and data description that `deit export` puts in the header (if any)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            text = (file.metadata() or {}).get("deit")
            weights = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return {**(json.loads(text) if text else {}), "model": weights}


def is_deit_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("format") == FORMAT


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a file: ours, an official DeiT ``{'model': ...}``, or a bare state dict."""
    return weights_of(load_checkpoint(path), path)


def weights_of(state: dict[str, Any], source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file (see ``read_state_dict``); ``source`` names it in errors."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    # weights saved from a DistributedDataParallel or torch.compile wrapper
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


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
