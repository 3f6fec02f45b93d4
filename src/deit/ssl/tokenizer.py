"""BEiT's visual tokens, from a k-means codebook of image patches trained here (``deit tokenizer``).

BEiT (Bao et al., 2022) names each image patch by a discrete visual token and
teaches the ViT to predict the tokens of masked patches. The paper's tokens
come from DALL-E's discrete VAE, which cannot be downloaded here. So the
tokenizer is a codebook of K centroids, fitted by k-means to patches of the
training images. A patch's token is its nearest centroid.

The patches are those the ViT sees: normalised pixels (the data set's mean and
std), one patch of the ViT's patch size per token, flattened. The codebook is
fitted by k-means (``ssl.kmeans``). The codebook and its
description are stored as one safetensors file. A pretraining run keeps the
codebook as a buffer in its checkpoint and its path in its config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import DeitError
from deit.ssl.kmeans import kmeans, nearest

log = logging.getLogger("deit")


class TokenizerError(DeitError, ValueError):
    """A tokenizer file that is missing, damaged, or made for other patches."""


@dataclass(frozen=True)
class TokenizerInfo:
    patch_size: int
    in_chans: int
    dataset: str
    input_size: int
    samples: int  # patches the codebook was fitted to
    inertia: float  # their mean squared distance to their centroid, at the end


class PatchTokenizer(nn.Module):
    """Images (B, C, H, W), normalised -> the token of each patch (B, patches), row by row."""

    def __init__(self, codebook: torch.Tensor, info: TokenizerInfo) -> None:
        super().__init__()
        self.register_buffer("codebook", codebook.float())  # (K, C * p * p)
        self.info = info

    @property
    def size(self) -> int:
        return len(self.codebook)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # distances in fp32, under bf16 autocast too
            patches = patchify(images.float(), self.info.patch_size)  # (B, N, D)
            return nearest(patches.flatten(0, 1), self.codebook).view(patches.shape[:2])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from deit.checkpoint import atomic_path

        with atomic_path(path) as tmp:
            save_file(
                {"codebook": self.codebook.contiguous()},
                str(tmp),
                metadata={"tokenizer": json.dumps(asdict(self.info))},
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchTokenizer:
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise TokenizerError(f"tokenizer {path} does not exist: train one with `deit tokenizer`")
        try:
            with safe_open(str(path), framework="pt") as file:
                text = (file.metadata() or {}).get("tokenizer")
                codebook = file.get_tensor("codebook")
        except (SafetensorError, KeyError) as error:
            raise TokenizerError(f"{path} is not a tokenizer written by `deit tokenizer`: {error}") from error
        if text is None:
            raise TokenizerError(f"{path} holds no tokenizer description: was it written by `deit tokenizer`?")
        return cls(codebook, TokenizerInfo(**json.loads(text)))

    def check(self, patch_size: int, in_chans: int) -> None:
        """Refuse a codebook made for other patches than this ViT's."""
        info = self.info
        if (info.patch_size, info.in_chans) != (patch_size, in_chans):
            raise TokenizerError(
                f"the tokenizer was fitted to {info.in_chans}-channel patches of {info.patch_size} px, the ViT has "
                f"{in_chans}-channel patches of {patch_size} px: train one with `deit tokenizer --patch-size "
                f"{patch_size}`"
            )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * p * p): the patches of the ViT's grid, row by row."""
    patches = F.unfold(images, kernel_size=patch_size, stride=patch_size)  # (B, C * p * p, N)
    return patches.transpose(1, 2)


def train_tokenizer(
    images: torch.Tensor,
    *,
    patch_size: int,
    codebook_size: int,
    dataset: str,
    samples: int = 100_000,
    iterations: int = 25,
    seed: int = 0,
) -> PatchTokenizer:
    """A codebook of ``codebook_size`` tokens fitted to ``samples`` random patches of ``images`` (normalised)."""
    patches = patchify(images.float(), patch_size).flatten(0, 1)
    generator = torch.Generator().manual_seed(seed)
    if len(patches) > samples:
        patches = patches[torch.randperm(len(patches), generator=generator)[:samples]]
    if len(patches) < codebook_size:
        raise TokenizerError(f"{len(patches)} patches cannot make a codebook of {codebook_size}: use fewer tokens")
    centroids, _, inertia = kmeans(patches, codebook_size, iterations=iterations, seed=seed)
    info = TokenizerInfo(patch_size, images.shape[1], dataset, images.shape[-1], len(patches), inertia)
    log.info("tokenizer: %d tokens fitted to %d patches of %d px, mean squared distance %.4f",
             codebook_size, len(patches), patch_size, inertia)  # fmt: skip
    return PatchTokenizer(centroids, info)
