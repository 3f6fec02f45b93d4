"""DeepCluster (Caron et al., 2018): cluster the features, then learn to predict the clusters.

Before each epoch:

1. the backbone's features of every training image (unaugmented);
2. PCA to ``pca_dim`` dimensions with whitening, then L2 normalisation;
3. k-means with k = ``clusters``, more than the classes (``ssl.kmeans``: an
   empty cluster is split off a full one, as the paper does);
4. each image's cluster becomes its pseudo-label. The classifier head is
   re-initialised, with its optimizer state, since last epoch's clusters mean
   nothing now. It trains at the peak learning rate throughout, as the paper's
   constant rate does: it must fit new clusters every epoch, and a head left
   near random by a decayed rate would teach the backbone noise (the loss
   climbed back to chance, ln k, over the last epochs of a cosine schedule).

During the epoch: cross-entropy of the head on one augmented view. As in the
paper, the epoch samples images uniformly over the clusters, so that a giant
cluster cannot dominate: as many draws as images, with replacement, each
image drawn with probability 1 / (clusters x its cluster's size)
(``sample_weights``; ``EpochSampler.draw_by``). The draw depends on the seed,
the epoch and the clusters only, so a resumed epoch and every torchrun
process draw the same images.

The epoch's record logs the normalised mutual information (NMI) of the clusters
with the true labels (where there are labels) and with the previous epoch's
clusters. The clusters and the head are buffers and parameters of the method, so a
checkpoint taken mid-epoch resumes with the same pseudo-labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deit.ssl.backbone import Backbone
from deit.ssl.kmeans import ClusteringError, kmeans
from deit.ssl.method import EpochContext, Method

log = logging.getLogger("deit")


@dataclass(frozen=True)
class ClusterSettings:
    clusters: int = 100
    pca_dim: int = 64
    iterations: int = 20
    seed: int = 0


class DeepCluster(Method):
    step_input = "view and index"

    def __init__(self, backbone: Backbone, *, num_images: int, settings: ClusterSettings) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings = settings
        self.classifier = nn.Linear(backbone.dim, settings.clusters)
        self.register_buffer("assignments", torch.zeros(num_images, dtype=torch.long))
        self.register_buffer("previous", torch.full((num_images,), -1, dtype=torch.long))
        self.register_buffer("cluster_sizes", torch.ones(settings.clusters))
        self.register_buffer("clustered_for", torch.tensor(-1))  # the epoch the assignments belong to
        # NMI with the labels and with the previous epoch's clusters; -1: nothing to compare with (finite, as the
        # checkpoint's weights and buffers must be)
        self.register_buffer("nmi", torch.full((2,), -1.0))

    def before_epoch(self, epoch: int, context: EpochContext) -> dict[str, Any]:
        """Cluster the features and reset the head, unless this epoch's clusters are already here (a resume)."""
        if int(self.clustered_for) != epoch:
            features = context.features(self.backbone)
            assigned = context.broadcast(self._cluster(features, epoch))  # every process: rank 0's clusters
            self.previous.copy_(self.assignments if int(self.clustered_for) >= 0 else torch.full_like(assigned, -1))
            self.assignments.copy_(assigned)
            self.cluster_sizes.copy_(torch.bincount(assigned, minlength=self.settings.clusters).float())
            labelled = context.labels >= 0
            with_labels = nmi(assigned[labelled], context.labels[labelled]) if labelled.any() else -1.0
            seen = self.previous >= 0
            with_previous = nmi(assigned[seen], self.previous[seen]) if seen.any() else -1.0
            self.nmi.copy_(torch.tensor([with_labels, with_previous]))
            self._reset_head(epoch, context.optimizer)
            self.clustered_for.fill_(epoch)
            log.info("epoch %d: %d clusters (largest %d images, %d empty), NMI with the labels %s, with the "
                     "previous epoch's clusters %s", epoch + 1, self.settings.clusters, int(self.cluster_sizes.max()),
                     int((self.cluster_sizes == 0).sum()), _shown(with_labels), _shown(with_previous))  # fmt: skip
        return {
            "clusters": {
                "nmi_labels": float(self.nmi[0]) if self.nmi[0] >= 0 else None,
                "nmi_previous": float(self.nmi[1]) if self.nmi[1] >= 0 else None,
                "largest": int(self.cluster_sizes.max()),
                "empty": int((self.cluster_sizes == 0).sum()),
            }
        }

    def unscheduled_parameters(self) -> set[str]:
        return {"classifier.weight", "classifier.bias"}  # see the module's note 4

    def _cluster(self, features: torch.Tensor, epoch: int) -> torch.Tensor:
        if len(features) < self.settings.clusters:
            raise ClusteringError(
                f"DeepCluster cannot make pretrain.clusters = {self.settings.clusters} clusters of "
                f"{len(features)} training images: lower it (--set pretrain.clusters=N) or give more images"
            )
        reduced = F.normalize(pca_whiten(features, self.settings.pca_dim), dim=1)
        seed = self.settings.seed * 1000 + epoch
        _, assigned, _ = kmeans(reduced, self.settings.clusters, iterations=self.settings.iterations, seed=seed)
        return assigned

    def _reset_head(self, epoch: int, optimizer: torch.optim.Optimizer | None) -> None:
        generator = torch.Generator().manual_seed(self.settings.seed * 1000 + epoch)
        weight = torch.empty_like(self.classifier.weight, device="cpu")
        nn.init.trunc_normal_(weight, std=0.02, generator=generator)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.zero_()
        if optimizer is not None:
            for parameter in self.classifier.parameters():
                optimizer.state.pop(parameter, None)  # Adam's moments belonged to last epoch's clusters

    def sample_weights(self) -> torch.Tensor:
        """Each image's chance to be drawn this epoch: every cluster gets the same share (empty ones none)."""
        return (1.0 / self.cluster_sizes.clamp_min(1))[self.assignments].cpu()

    def losses(self, views: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = self.assignments[indices]
        logits = self.classifier(self.backbone(views)).float()
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return {"loss": loss, "cluster_loss": loss.detach(), "cluster_accuracy": accuracy.detach()}


def pca_whiten(features: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """``features`` (N, D) projected on their top ``dim`` principal axes, each scaled to unit variance."""
    centred = features.double() - features.double().mean(dim=0)
    covariance = centred.T @ centred / max(len(features) - 1, 1)
    variances, axes = torch.linalg.eigh(covariance)  # ascending
    keep = min(dim, features.shape[1])
    variances, axes = variances[-keep:].flip(0), axes[:, -keep:].flip(1)
    return (centred @ axes / (variances.clamp_min(0) + eps).sqrt()).float()


def nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised mutual information of two labellings of the same items: I(a; b) / sqrt(H(a) H(b))."""
    a, b = torch.unique(a, return_inverse=True)[1], torch.unique(b, return_inverse=True)[1]
    rows, columns = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * columns + b, minlength=rows * columns).view(rows, columns).double() / len(a)
    pa, pb = joint.sum(dim=1), joint.sum(dim=0)
    present = joint > 0
    mutual = (joint[present] * (joint[present] / (pa[:, None] * pb[None, :])[present]).log()).sum()
    entropy_a, entropy_b = -(pa * pa.log()).sum(), -(pb * pb.log()).sum()
    if entropy_a == 0 or entropy_b == 0:
        return 1.0 if entropy_a == entropy_b else 0.0
    return float(mutual / (entropy_a * entropy_b).sqrt())


def _shown(score: float) -> str:
    """An NMI for the log; the -1 sentinel (no labels, or no previous epoch) reads as what it means."""
    return f"{score:.3f}" if score >= 0 else "n/a"
