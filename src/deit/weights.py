"""Reading weight files safely: ours, official DeiT files, timm state dicts, safetensors, hash-checked URLs.

Everything is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only, never pickled objects. Reads never fall back
to full unpickling, since that can run arbitrary code. A URL is downloaded
once into torch's hub cache and only used if its SHA-256 matches the hash in
its file name (``deit_tiny_patch16_224-a1311bcf.pth``, the official and
torchvision convention) or in a ``#sha256=<hex>`` suffix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from deit.errors import DeitError

FORMAT = "deit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(DeitError, ValueError):
    """A file that is not a checkpoint we can use, with the reason."""


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
