"""The self-supervised objectives, as functions of embeddings: NT-Xent, InfoNCE with a queue, CMC's, BYOL's.

Every function takes float embeddings of shape (N, D), normalises them
itself where the method does, and computes in fp32 whatever autocast the
caller runs under: similarities of unit vectors divided by a small
temperature overflow bf16's precision long before they overflow its range.
Casting the embeddings to fp32 is not enough, since autocast would round a
matrix product's inputs back to bf16; so each function turns autocast off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _in_fp32(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss`` with autocast off on its first argument's device, so that its products stay fp32."""

    @functools.wraps(loss)
    def run(first: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(first.device.type, enabled=False):
            return loss(first, *args, **kwargs)

    return run


@_in_fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over the 2N views of N images.

    View i of one image is the positive of its other view; the 2N - 2 views of
    the other images are its negatives. The mean over all 2N views.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
    n = len(z1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


@_in_fp32
def info_nce(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """MoCo's contrastive loss: each query against its own key and the negatives.

    With a ``queue`` (K, D) of earlier keys (MoCo v2), the negatives are the
    queue's keys. Without one (MoCo v3), they are the other images' keys in
    the batch, and the loss is scaled by 2 x temperature as in its paper.
    ``keys`` carry no gradient: they come from the momentum encoder.
    """
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1).detach()
    if queue is not None:
        positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        negatives = q @ F.normalize(queue.float(), dim=1).T  # (N, K)
        logits = torch.cat([positive, negatives], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    logits = q @ k.T / temperature  # (N, N): the diagonal holds the positives
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


@_in_fp32
def cross_view_info_nce(
    anchors: torch.Tensor, others: torch.Tensor, queue: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """CMC's loss: each anchor (view 1) against its own image's embedding in view 2, among the others.

    The candidates are every image of the batch in view 2 (the diagonal holds
    the positives) and, with a ``queue``, earlier view-2 embeddings. Both views
    carry gradients: each has its own encoder, and both learn.
    """
    a, b = F.normalize(anchors.float(), dim=1), F.normalize(others.float(), dim=1)
    logits = a @ b.T
    if queue is not None:
        logits = torch.cat([logits, a @ F.normalize(queue.float(), dim=1).T], dim=1)
    return F.cross_entropy(logits / temperature, torch.arange(len(a), device=a.device))


@_in_fp32
def byol_loss(online_prediction: torch.Tensor, target_projection: torch.Tensor) -> torch.Tensor:
    """BYOL's regression of the online prediction onto the target projection: 2 - 2 cos, the batch mean.

    The target carries no gradient; the symmetric loss is the sum of this for
    (view 1 -> view 2) and (view 2 -> view 1).
    """
    p = F.normalize(online_prediction.float(), dim=1)
    z = F.normalize(target_projection.float(), dim=1).detach()
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def flush_denormal_gradient(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` unchanged, but with the gradient that comes back to it flushed to zero below fp32's smallest normal.

    Unnormalised scores (CPC's) grow apart as a network learns, until a softmax
    gives many candidates a probability below 1.2e-38: a denormal number, which
    x86 CPUs multiply in microcode, many times slower. The matrix products of
    the backward pass then slow down with training (CPC's run went from 545 to
    368 images/s). ``torch.set_flush_denormal`` would flush them, but only on the
    thread that calls it, not on the threads that share a product. A denormal is
    far below anything a weight update can feel, so zero is the same gradient.
    """
    if scores.requires_grad:
        scores.register_hook(lambda grad: grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0))
    return scores
