"""k-means, for BEiT's visual tokens and DeepCluster's pseudo-labels.

k-means++ seeding, then Lloyd iterations. A cluster left empty is handled as
DeepCluster (Caron et al., 2018) does: a non-empty cluster, chosen at random
in proportion to its size, is split in two. Its centroid is copied to the empty
cluster, and the two copies are pushed apart by a small random perturbation, so
that the next assignment divides its points between them.
"""

from __future__ import annotations

import torch

from deit.errors import DeitError


class ClusteringError(DeitError, ValueError):
    """Too few points for the clusters asked for."""


def nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of each point's nearest centroid (squared Euclidean distance), in chunks."""
    squared = centroids.square().sum(dim=1)
    return torch.cat([
        (squared - 2 * points[start : start + chunk] @ centroids.T).argmin(dim=1)
        for start in range(0, len(points), chunk)
    ])  # fmt: skip


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    iterations: int = 25,
    seed: int = 0,
    init: torch.Tensor | None = None,
    perturbation: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centroids (k, D) of ``points`` (N, D), each point's cluster (N,), and the mean squared distance."""
    if len(points) < k:
        raise ClusteringError(f"{len(points)} points cannot make {k} clusters: ask for fewer, or give more images")
    generator = torch.Generator().manual_seed(seed)
    centroids = init.clone().to(points) if init is not None else _plus_plus(points, k, generator)
    for _ in range(iterations):
        assigned = nearest(points, centroids)
        counts = torch.bincount(assigned, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, points)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        for empty in (counts == 0).nonzero().flatten().tolist():
            donor = int(torch.multinomial(counts.float().cpu(), 1, generator=generator))
            noise = perturbation * torch.randn(centroids.shape[1], generator=generator).to(points)
            centroids[empty] = centroids[donor] + noise
            centroids[donor] = centroids[donor] - noise
            counts[empty] = counts[donor] = counts[donor] // 2  # both halves may donate again this round
    assigned = nearest(points, centroids)
    inertia = (points - centroids[assigned]).square().sum(dim=1).mean().item()
    return centroids, assigned, inertia


def _plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++: each next seed drawn in proportion to its squared distance from the seeds so far."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    distance = (points - points[chosen[0]]).square().sum(dim=1)
    for _ in range(k - 1):
        index = int(torch.multinomial(distance.clamp_min(0).cpu() + 1e-12, 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (points - points[index]).square().sum(dim=1))
    return points[chosen].clone()
