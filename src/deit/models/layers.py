"""The building blocks of a vision transformer: patch embedding, attention, MLP, block.

Parameter names follow the official DeiT / timm layout (``patch_embed.proj``,
``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2``) so
their checkpoints load into these modules with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import ModelError

ATTENTION_IMPLS = ("sdpa", "math")


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # one Bernoulli draw per sample, broadcast over tokens and channels
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to ``embed_dim``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ModelError(f"input size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height != self.img_size or width != self.img_size:
            raise ValueError(
                f"the model expects {self.img_size}x{self.img_size} inputs, got {height}x{width}; "
                "resample the position embedding to change resolution"
            )
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention.

    ``impl="sdpa"`` calls ``F.scaled_dot_product_attention`` (fused kernels on
    GPU). ``impl="math"`` spells the softmax out; on CPU under bf16 autocast it
    trains small models faster, because the fused CPU backward is slow there.
    Both give the same result up to rounding.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.impl = impl
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of every head, (B, heads, N, N): for analysis, not training."""
        q, k, _ = self._split_heads(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self._split_heads(x)
        dropout = self.attn_drop if self.training else 0.0
        if self.impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = F.dropout(attn, dropout, self.training) @ v
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
