"""BEiT's visual tokens, from a tokenizer of image patches trained here (``deit tokenizer``).

BEiT (Bao et al., 2022) names each image patch by a discrete visual token and
teaches the ViT to predict the tokens of masked patches. The paper's tokens
come from DALL-E's discrete VAE, which cannot be downloaded here. So the
tokenizer is fitted here, to patches of the training images, in one of two
kinds:

* ``kmeans``: a codebook of K centroids (``ssl.kmeans``); a patch's token is
  its nearest centroid;
* ``dvae``: a small discrete VAE. An MLP encoder gives K logits per patch,
  and a Gumbel-softmax sample of them (its temperature annealed from 1 to
  1/16) goes through an MLP decoder that must rebuild the patch. A KL term
  keeps the tokens' mean distribution close to uniform. A patch's token is the
  encoder's argmax.

The patches are those the ViT sees: normalised pixels (the data set's mean and
std), one patch of the ViT's patch size per token, flattened. Both kinds keep
each token's picture: the centroid, or the decoder's output for that token.
Two figures on held-out patches say how well a tokenizer serves. The first is
the mean squared error between a patch and its token's picture: how much of
the patch the token keeps. The second is the perplexity of the tokens' use:
how many tokens carry the data, out of K.

The tokenizer and its description are one safetensors file. A pretraining
run keeps the tokenizer as buffers in its checkpoint and the file's path in
its config. Once it has started or resumed, it logs the description and a
fingerprint of the tokenizer it trains with (``PatchTokenizer.fingerprint``,
which ``deit tokenizer`` prints too): resumed, that is the checkpoint's copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import DeitError
from deit.ssl.kmeans import kmeans, nearest

log = logging.getLogger("deit")

KINDS = ("kmeans", "dvae")


class TokenizerError(DeitError, ValueError):
    """A tokenizer file that is missing, damaged, or made for other patches."""


@dataclass(frozen=True)
class TokenizerInfo:
    patch_size: int
    in_chans: int
    dataset: str
    input_size: int
    samples: int  # patches it was fitted to
    reconstruction_mse: float  # held-out patches against their token's picture
    kind: str = "kmeans"
    hidden: int = 0  # dvae: width of the encoder's hidden layer
    perplexity: float = 0.0  # exp(entropy) of the tokens' use on held-out patches


class PatchTokenizer(nn.Module):
    """Images (B, C, H, W), normalised -> the token of each patch (B, patches), row by row."""

    def __init__(self, codebook: torch.Tensor, info: TokenizerInfo, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.register_buffer("codebook", codebook.float())  # (K, C * p * p): each token's picture
        self.encoder = encoder  # dvae: patch -> K logits; None: the nearest picture names the patch
        if encoder is not None:
            encoder.requires_grad_(False)
        self.info = info

    @property
    def size(self) -> int:
        return len(self.codebook)

    def fingerprint(self) -> str:
        """12 hex digits of the sha256 of its tensors: which tokenizer a run used, whatever the file's name."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    def describe(self) -> str:
        """One line for a run's log: what the tokens are and how well they keep the patches."""
        info = self.info
        return (
            f"{info.kind} tokenizer of {self.size} tokens for {info.in_chans}-channel {info.patch_size} px patches, "
            f"fitted to {info.samples} patches of {info.dataset} (held-out error {info.reconstruction_mse:.4f}, "
            f"perplexity {info.perplexity:.0f}), fingerprint {self.fingerprint()}"
        )

    @torch.no_grad()
    def tokens_of_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, C * p * p) flattened patches -> (M,) tokens."""
        if self.encoder is None:
            return nearest(patches, self.codebook)
        return self.encoder(patches).argmax(dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # in fp32, under bf16 autocast too
            patches = patchify(images.float(), self.info.patch_size)  # (B, N, D)
            return self.tokens_of_patches(patches.flatten(0, 1)).view(patches.shape[:2])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from deit.files import atomic_path

        tensors = {"codebook": self.codebook}
        if self.encoder is not None:
            tensors.update({f"encoder.{key}": value for key, value in self.encoder.state_dict().items()})
        with atomic_path(path) as tmp:
            save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp),
                      metadata={"tokenizer": json.dumps(asdict(self.info))})  # fmt: skip
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchTokenizer:
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise TokenizerError(f"tokenizer {path} does not exist: train one with `deit tokenizer`")
        try:
            with safe_open(str(path), framework="pt") as file:
                text = (file.metadata() or {}).get("tokenizer")
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
        except SafetensorError as error:
            raise TokenizerError(f"{path} is not a tokenizer written by `deit tokenizer`: {error}") from error
        if text is None or "codebook" not in tensors:
            raise TokenizerError(f"{path} holds no tokenizer description: was it written by `deit tokenizer`?")
        info = TokenizerInfo(**json.loads(text))
        codebook, encoder = tensors["codebook"], None
        if info.kind == "dvae":
            encoder = _encoder(codebook.shape[1], info.hidden, len(codebook))
            encoder.load_state_dict({key.removeprefix("encoder."): value for key, value in tensors.items()
                                     if key.startswith("encoder.")})  # fmt: skip
        return cls(codebook, info, encoder)

    def check(self, patch_size: int, in_chans: int) -> None:
        """Refuse a tokenizer made for other patches than this ViT's."""
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


def _encoder(dim: int, hidden: int, size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, size))


def quality(tokenizer: PatchTokenizer, patches: torch.Tensor) -> tuple[float, float]:
    """On held-out ``patches``: the mean squared error against their token's picture, and the tokens' perplexity."""
    tokens = tokenizer.tokens_of_patches(patches)
    mse = (patches - tokenizer.codebook[tokens]).square().mean().item()
    use = torch.bincount(tokens, minlength=tokenizer.size).float() / len(tokens)
    entropy = -(use[use > 0] * use[use > 0].log()).sum().item()
    return mse, math.exp(entropy)


def train_tokenizer(
    images: torch.Tensor,
    *,
    patch_size: int,
    codebook_size: int,
    dataset: str,
    kind: str = "kmeans",
    samples: int = 100_000,
    held_out: torch.Tensor | None = None,
    seed: int = 0,
) -> PatchTokenizer:
    """A tokenizer of ``codebook_size`` tokens fitted to ``samples`` random patches of ``images`` (normalised).

    Its quality is measured on the patches of ``held_out`` images (default: the fitted patches).
    """
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    patches = patchify(images.float(), patch_size).flatten(0, 1)
    generator = torch.Generator().manual_seed(seed)
    if len(patches) > samples:
        patches = patches[torch.randperm(len(patches), generator=generator)[:samples]]
    if len(patches) < codebook_size:
        raise TokenizerError(f"{len(patches)} patches cannot make a codebook of {codebook_size}: use fewer tokens")
    info = TokenizerInfo(patch_size, images.shape[1], dataset, images.shape[-1], len(patches), 0.0, kind)
    if kind == "kmeans":
        tokenizer = PatchTokenizer(kmeans(patches, codebook_size, seed=seed)[0], info)
    else:
        tokenizer = _train_dvae(patches, codebook_size, info, seed=seed)
    test = patchify(held_out.float(), patch_size).flatten(0, 1) if held_out is not None else patches
    mse, perplexity = quality(tokenizer, test)
    tokenizer.info = TokenizerInfo(**{**asdict(tokenizer.info), "reconstruction_mse": mse, "perplexity": perplexity})
    log.info("%s tokenizer: %d tokens fitted to %d patches of %d px; held-out patches: mean squared error %.4f "
             "against their token's picture, perplexity %.0f", kind, codebook_size, len(patches), patch_size, mse,
             perplexity)  # fmt: skip
    return tokenizer


def _train_dvae(
    patches: torch.Tensor, size: int, info: TokenizerInfo, *, seed: int, hidden: int = 256, epochs: int = 20
) -> PatchTokenizer:
    """The discrete VAE of the module's docstring, trained with Adam on ``patches``; its encoder is the tokenizer."""
    torch.manual_seed(seed)
    dim = patches.shape[1]
    encoder = _encoder(dim, hidden, size)
    decoder = nn.Sequential(nn.Linear(size, hidden), nn.GELU(), nn.Linear(hidden, dim))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    batch, generator = 1024, torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(patches) / batch)
    for step in range(steps):
        chosen = patches[torch.randint(len(patches), (batch,), generator=generator)]
        temperature = 1.0 * (1 / 16) ** (step / max(steps - 1, 1))  # annealed from 1 to 1/16
        logits = encoder(chosen)
        sample = F.gumbel_softmax(logits, tau=temperature)
        reconstruction = F.mse_loss(decoder(sample), chosen)
        mean_use = logits.softmax(dim=1).mean(dim=0)
        kl_to_uniform = (mean_use * (mean_use * size).clamp_min(1e-12).log()).sum()
        loss = reconstruction + 0.1 * kl_to_uniform
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pictures = decoder(torch.eye(size))  # each token's picture: the decoder's output for it alone
    return PatchTokenizer(pictures, TokenizerInfo(**{**asdict(info), "hidden": hidden}), encoder.eval())
