"""``deit eval``: every head of a trained checkpoint on a validation set."""

from __future__ import annotations

from pathlib import Path

from deit.checkpoint import Checkpoint
from deit.distributed import resolve_device
from deit.engine import Precision, evaluate


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_path: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    amp: str | None = None,
    eval_output: str | None = None,
    use_ema: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Validation metrics of every head of a ``deit train`` checkpoint (or of its EMA weights).

    ``amp`` None evaluates in the precision the checkpoint's run used (``auto`` for weights from elsewhere), so
    the numbers match the run's own log on the same kind of hardware.
    """
    saved = Checkpoint.load(checkpoint)
    torch_device = resolve_device(device)
    if amp is None:
        amp = saved.config.get("run", {}).get("amp", "auto")
        if amp == "fp16" and torch_device.type != "cuda":
            amp = "auto"  # a GPU run's fp16 has no fast path elsewhere: bf16 where native, else fp32
    model = saved.build_model(use_ema=use_ema, **({"eval_output": eval_output} if eval_output else {}))
    loader, _ = saved.eval_data(dataset=dataset, data_path=data_path, batch_size=batch_size)
    return evaluate(
        model.to(torch_device),
        loader,
        device=torch_device,
        precision=Precision.resolve(amp, torch_device),
        progress=progress,
    )
