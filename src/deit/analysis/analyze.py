"""``deit analyze``: a trained student on its validation set, as the paper's analysis of the two tokens."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from deit.analysis import figures
from deit.analysis.agreement import agreement_matrix, collect_predictions, confusion_matrix
from deit.analysis.attention import token_maps
from deit.analysis.tokens import head_cosine, token_cosine_labels, token_cosines
from deit.checkpoint import Checkpoint
from deit.distributed import resolve_device
from deit.engine import Precision
from deit.models import VisionTransformer
from deit.teachers import InputSpec, build_teacher

log = logging.getLogger("deit")

# rows of the agreement table, in the paper's order; those a run lacks are left out
PREDICTORS = ("labels", "teacher", "baseline", "cls", "dist", "prediction")


def analyze_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    dataset: str | None = None,
    data_path: str | None = None,
    teacher: str | None = None,
    baseline: str | None = None,
    num_images: int = 8,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Write ``analysis.json`` and PNG figures into ``output_dir``; returns what the JSON holds."""
    saved = Checkpoint.load(checkpoint)
    model = saved.build_model().eval()
    torch_device = resolve_device(device)
    loader, info = saved.eval_data(dataset=dataset, data_path=data_path, batch_size=batch_size)
    others = {}
    if teacher:
        spec = InputSpec(info.in_chans, info.mean, info.std)
        others["teacher"] = build_teacher(
            None, teacher, student_input=spec, num_classes=info.num_classes, class_names=info.class_names,
            input_size=saved.data.input_size,
        )  # fmt: skip
    if baseline:
        others["baseline"] = Checkpoint.load(baseline).build_model()
    predictions = collect_predictions(
        model.to(torch_device),
        loader,
        device=torch_device,
        precision=Precision.resolve("none", torch_device),
        others={name: other.to(torch_device) for name, other in others.items()},
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = _agreement_part(predictions, info.class_names, out)
    result["checkpoint"] = str(checkpoint)
    if isinstance(model, VisionTransformer) and model.distilled:
        images = torch.stack([loader.dataset[i][0] for i in range(min(num_images, len(loader.dataset)))])
        result.update(_token_part(model.cpu(), images, out))
    else:
        result["tokens"] = "not analysed: the model has no distillation token"
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)
    return result


def _agreement_part(predictions: dict[str, torch.Tensor], class_names: list[str], out: Path) -> dict[str, Any]:
    labels = predictions["labels"]
    names = [name for name in PREDICTORS if name in predictions]
    shown = [{"prediction": "fused"}.get(name, name) for name in names]
    agreement = agreement_matrix(predictions, names)
    top1 = {
        name: 100.0 * (predictions[name] == labels).float().mean().item() for name in predictions if name != "labels"
    }
    confusion = confusion_matrix(labels, predictions["prediction"], len(class_names))
    figures.save(
        figures.matrix_figure(100 * agreement, shown, shown, "agreement (% of images)", ".1f"), out / "agreement.png"
    )
    figures.save(
        figures.matrix_figure(confusion, class_names, class_names, "confusion (true \u2192 predicted)", "d"),
        out / "confusion.png",
    )
    return {
        "num_images": len(labels),
        "top1": top1,
        "agreement": {"predictors": shown, "percent": (100 * agreement).tolist()},
        "confusion": {"classes": list(class_names), "counts": confusion.tolist()},
    }


def _token_part(model: VisionTransformer, images: torch.Tensor, out: Path) -> dict[str, Any]:
    cosines = token_cosines(model, images)
    labels = token_cosine_labels(len(model.blocks))
    figures.save(figures.cosine_figure(cosines, labels), out / "token_cosine.png")
    maps = token_maps(model, images)
    figures.save(figures.attention_figure(images, maps), out / "attention.png")
    return {"token_cosine": dict(zip(labels, cosines, strict=True)), "head_weight_cosine": head_cosine(model)}
