"""``deit predict``: the top classes of image files, by a trained checkpoint.

Images are read as the model was trained (grayscale or RGB), resized and
centre-cropped to its input size, and normalised with the checkpoint's own
mean and std. A file that cannot be read gets an error of its own; the
other files are still predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from deit.checkpoint import Checkpoint
from deit.data.transforms import eval_transform
from deit.distributed import resolve_device
from deit.engine import Precision

# what Pillow raises for files that are not images or are damaged; some broken PNG chunks raise SyntaxError
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first; empty when error is set
    error: str | None = None

    def to_dict(self) -> dict:
        classes = [{"class": name, "probability": round(prob, 6)} for name, prob in self.top]
        return {"path": self.path, "predictions": classes, "error": self.error}


def read_image(path: str | Path, in_chans: int) -> Image.Image:
    """The image at ``path`` as grayscale (1 channel) or RGB, fully decoded so that damage shows here."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("P", "PA", "LA") or "transparency" in image.info:
            image = image.convert("RGBA")  # palette and alpha images: resolve the palette before dropping alpha
        return image.convert("L" if in_chans == 1 else "RGB")


class Predictor:
    """A checkpoint's model with the preprocessing it was trained with."""

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        use_ema: bool = False,
        eval_output: str | None = None,
        device: str = "auto",
        amp: str = "none",
    ) -> None:
        saved = Checkpoint.load(checkpoint)
        options = {"eval_output": eval_output} if eval_output else {}
        self.device = resolve_device(device)
        self.precision = Precision.resolve(amp, self.device)
        self.model: nn.Module = saved.build_model(use_ema=use_ema, **options).to(self.device).eval()
        data = saved.data
        self.class_names: list[str] = list(data.class_names)
        self.in_chans: int = saved.model_spec.in_chans
        # native_size=None: every file is resized to the input size, whatever its own size
        self.transform = eval_transform(input_size=data.input_size, mean=data.mean, std=data.std)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            logits = self.model(images.to(self.device))
        return logits.float().softmax(dim=-1).cpu()  # also right for softmax_sum, whose output is log-probabilities

    def predict(self, paths: Sequence[str | Path], *, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
        """One Prediction per path, in order; unreadable files carry an error instead of classes."""
        results: dict[int, Prediction] = {}
        readable: list[tuple[int, torch.Tensor]] = []
        for index, path in enumerate(paths):
            try:
                readable.append((index, self.transform(read_image(path, self.in_chans))))
            except FileNotFoundError:
                results[index] = Prediction(str(path), [], "no such file")
            except UNREADABLE_IMAGE_ERRORS as error:
                results[index] = Prediction(str(path), [], f"not a readable image ({error})")
        k = min(top_k, len(self.class_names))
        for start in range(0, len(readable), batch_size):
            chunk = readable[start : start + batch_size]
            probs = self.probabilities(torch.stack([tensor for _, tensor in chunk]))
            values, indices = probs.topk(k, dim=-1)
            for (index, _), row_values, row_indices in zip(chunk, values, indices, strict=True):
                top = [(self.class_names[i], p) for i, p in zip(row_indices.tolist(), row_values.tolist(), strict=True)]
                results[index] = Prediction(str(paths[index]), top)
        return [results[index] for index in range(len(paths))]
