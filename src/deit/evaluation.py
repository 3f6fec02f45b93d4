"""``deit eval``: every head of a trained checkpoint on a validation set."""

from __future__ import annotations

from pathlib import Path

from deit.checkpoint import load_checkpoint, model_from_checkpoint
from deit.data import build_eval_data
from deit.engine import Precision, evaluate
from deit.training import RunError, resolve_device


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_path: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    amp: str = "none",
    eval_output: str | None = None,
    use_ema: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Validation metrics of every head of a ``deit train`` checkpoint (or of its EMA weights)."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, use_ema=use_ema, **({"eval_output": eval_output} if eval_output else {}))
    saved = state["data"]
    config = state.get("config", {}).get("data", {})
    torch_device = resolve_device(device)
    loader, info = build_eval_data(
        dataset or saved["dataset"],
        data_path if data_path is not None else config.get("path"),
        batch_size=batch_size,
        input_size=saved["input_size"],
        in_chans=state["model_spec"]["in_chans"],
    )
    if list(info.class_names) != list(saved["class_names"]):
        raise RunError(
            f"the checkpoint was trained on {len(saved['class_names'])} classes {saved['class_names'][:5]}..., "
            f"the data set has {info.num_classes} {list(info.class_names)[:5]}..."
        )
    return evaluate(
        model.to(torch_device),
        loader,
        device=torch_device,
        precision=Precision.resolve(amp, torch_device),
        progress=progress,
    )
