"""``deit export``: a trained checkpoint as safetensors, TorchScript or ONNX.

Every exported file takes a normalised float batch ``(B, C, H, W)`` of any
batch size and returns ``(B, classes)`` logits (log-probabilities for
``softmax_sum``), and carries what a user needs to feed it: class names, mean,
std, input size and which head it predicts with:

* safetensors: the weights, with that description in the header metadata; it
  loads back with ``deit eval`` / ``deit predict`` / ``load_checkpoint``;
* TorchScript: a traced module, the description in the extra file ``deit.json``;
* ONNX: opset 18 with a dynamic batch axis, the description in the model's
  ``metadata_props`` under ``deit``; checked against PyTorch with
  onnxruntime when it is installed.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
)
from deit.errors import DeitError
from deit.files import atomic_path
from deit.models import EVAL_OUTPUTS, VisionTransformer, fuse_heads

log = logging.getLogger("deit")

EXPORT_FORMATS = ("safetensors", "torchscript", "onnx")
# "fused" keeps the checkpoint's own eval output; the others choose one (see models.vit.EVAL_OUTPUTS)
EXPORT_HEADS = ("fused", *EVAL_OUTPUTS)
ONNX_TOLERANCE = 1e-4


class ExportError(DeitError, ValueError):
    """An export that cannot be done as asked, with the reason."""


class PredictionHead(nn.Module):
    """A model in eval mode that returns one prediction: a chosen head of a distilled DeiT, or the model's output."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.head == "fused":
            return self.model(images)
        heads = self.model.forward_heads(images)
        if "dist" not in heads:  # one head: every choice that exists is the same prediction
            return heads["cls"]
        return fuse_heads(heads["cls"], heads["dist"], self.head)


def _check_head(model: nn.Module, head: str) -> None:
    if head not in EXPORT_HEADS:
        raise ExportError(f"unknown head {head!r}; choose one of {EXPORT_HEADS}")
    distilled = isinstance(model, VisionTransformer) and model.distilled
    if head in ("dist", "avg_logits", "softmax_sum") and not distilled:
        raise ExportError(f"--head {head} needs a distilled DeiT; this model has a single head (use fused or cls)")
    if head == "cls" and not isinstance(model, VisionTransformer):
        raise ExportError("--head cls is for DeiT models; this model has one output: use fused")


def description(checkpoint: Checkpoint, head: str) -> dict[str, Any]:
    """What travels with an exported file: the model spec, the data it expects, and the head."""
    state = checkpoint.state_dict()
    spec = json.loads(json.dumps(state["model_spec"]))  # a deep copy of plain data
    if head != "fused" and "eval_output" in spec.get("options", {}):
        spec["options"]["eval_output"] = head
    return {"format": FORMAT, "version": FORMAT_VERSION, "model_spec": spec, "data": state["data"], "head": head}


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    format: str,
    head: str = "fused",
    use_ema: bool = False,
) -> Path:
    """Write ``checkpoint``'s model (or its EMA) to ``output`` in ``format``; returns the path written."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {EXPORT_FORMATS}")
    saved = Checkpoint.load(checkpoint)
    model = saved.build_model(use_ema=use_ema).eval()
    _check_head(model, head)
    meta = description(saved, head)
    module = PredictionHead(model, head).eval()
    size = saved.data.input_size
    example = torch.randn(2, saved.model_spec.in_chans, size, size)
    with atomic_path(output) as tmp:  # a failed export leaves any earlier file at output as it was
        if format == "safetensors":
            _save_safetensors(model, meta, tmp)
        elif format == "torchscript":
            _save_torchscript(module, example, meta, tmp)
        else:
            _save_onnx(module, example, meta, tmp)
    log.info("exported %s (%s, head %s) to %s", saved.model_spec.name, format, head, output)
    return Path(output)


def _save_safetensors(model: nn.Module, meta: dict[str, Any], output: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; a state dict of a trained model has none, but be explicit
    weights = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(weights, str(output), metadata={"deit": json.dumps(meta)})


def _save_torchscript(module: nn.Module, example: torch.Tensor, meta: dict[str, Any], output: Path) -> None:
    with warnings.catch_warnings():
        # tracing warns that it is deprecated and that the input-size check becomes a constant: both expected
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example)
        torch.jit.save(traced, str(output), _extra_files={"deit.json": json.dumps(meta)})


def _save_onnx(module: nn.Module, example: torch.Tensor, meta: dict[str, Any], output: Path) -> None:
    try:
        import onnx
    except ImportError as error:
        raise ExportError("ONNX export needs the onnx extra: pip install 'deit[onnx]'") from error
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        input_names=["images"],
        output_names=["logits"],
        opset_version=18,
        verbose=False,
    )
    program.save(str(output))
    proto = onnx.load(str(output))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "deit", json.dumps(meta)
    onnx.save(proto, str(output))
    difference = onnx_max_difference(module, output, example)
    if difference is not None:
        if difference > ONNX_TOLERANCE:
            raise ExportError(f"the ONNX model differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE})")
        log.info("onnxruntime matches PyTorch: max abs difference %.2e", difference)


def onnx_max_difference(module: nn.Module, path: Path, example: torch.Tensor) -> float | None:
    """Largest absolute difference between onnxruntime and PyTorch on ``example`` and on one image of it."""
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: the ONNX file was not checked against PyTorch")
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for images in (example, example[:1]):
            theirs = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
            worst = max(worst, (theirs - module(images)).abs().max().item())
    return worst


def read_description(path: str | Path) -> dict[str, Any]:
    """The description embedded in an exported safetensors, TorchScript or ONNX file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get("deit")
    elif path.suffix == ".safetensors":
        state = load_checkpoint(path)
        text = json.dumps({key: value for key, value in state.items() if key != "model"}) if "head" in state else None
    else:
        extra = {"deit.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what users load
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra["deit.json"] or None
    if text is None:
        raise CheckpointError(f"{path} was not exported by deit: it carries no description")
    return json.loads(text)
