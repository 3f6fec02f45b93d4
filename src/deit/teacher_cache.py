"""Reusing the teacher's predictions across epochs (after "fast knowledge distillation", Shen & Xing 2021).

The online teacher runs on every augmented batch, every epoch: with a
ResNet-18 teaching a 1 M-parameter student it is a quarter of each step.
With ``--teacher-cache-views V``, every training image gets V fixed augmented
views, used in turn (epoch e shows view e mod V): the sampler derives each
view's augmentation seed from (seed, image, view) instead of (seed, epoch,
position). The teacher runs on a view the first time it is drawn and its
logits are kept in memory (images × V × classes floats); from epoch V on,
the teacher is not called at all.

Exactness: the student is trained on the teacher's logits for exactly the
image it sees, as online, so soft and hard distillation targets are the same
as an online teacher's on those views. What changes is the augmentation: V
distinct views per image instead of a new one each epoch. Batch mixing
(Mixup / CutMix) would need the teacher on the mixed image, which a cache
cannot hold, and repeated augmentation would show the same view several
times per epoch; both are refused with the cache. The cache is part of the
checkpoint, so a resumed run reads the same logits.
"""

from __future__ import annotations

import torch
from torch import nn

from deit.config import ConfigError

# refuse caches that would not fit comfortably in memory
MAX_CACHE_BYTES = 4 * 2**30


class TeacherCache(nn.Module):
    """Logits of ``teacher`` on each (image, view), computed on first use."""

    def __init__(self, teacher: nn.Module, num_images: int, views: int, num_classes: int) -> None:
        super().__init__()
        size = num_images * views * num_classes * 4
        if size > MAX_CACHE_BYTES:
            raise ConfigError(
                f"distill.teacher_cache_views: a teacher cache of {num_images} images x {views} views "
                f"x {num_classes} classes needs "
                f"{size / 2**30:.1f} GiB; use fewer --teacher-cache-views or the online teacher"
            )
        self.teacher = teacher
        self.views = views
        self.view = 0  # the view of the epoch being trained: epoch % views
        self.register_buffer("logits", torch.zeros(num_images, views, num_classes))  # moves with .to(device)
        # which (image, view) is filled: kept on the host with the batch's indices, so that asking whether a
        # batch needs the teacher never waits for the device
        self.filled = torch.zeros(num_images, views, dtype=torch.bool)
        self.calls = 0  # teacher forward passes, for the log

    @property
    def name(self) -> str:
        return getattr(self.teacher, "name", "teacher")

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    @torch.no_grad()
    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits for ``images``, the views of dataset ``indices`` in this epoch."""
        if indices is None:  # evaluation: no views, no cache
            return self.teacher(images)
        indices = indices.cpu()  # already on the host in training (see Batch.to): no copy
        missing = ~self.filled[indices, self.view]
        if missing.any():
            fresh = self.teacher(images[missing.to(images.device, non_blocking=True)])
            rows = indices[missing].to(self.logits.device, non_blocking=True)
            self.logits[rows, self.view] = fresh.float().to(self.logits.device)
            self.filled[indices[missing], self.view] = True
            self.calls += 1
        rows = indices.to(self.logits.device, non_blocking=True)
        return self.logits[rows, self.view].to(images.device)
