"""What a training loader yields: a ``Batch``, the same record whichever path made it.

Two paths make batches. The per-image path (PIL transforms in loader workers)
yields finished float images. The whole-batch path (in-memory images, see
``data.batched``) yields uint8 images with one seed per image, and the
training step augments them on the device. Both carry each image's index in
the training set, which a teacher cache or stored pseudo-labels look their
targets up by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import default_collate


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W): normalised floats, or uint8 still to augment when ``seeds`` is set
    labels: torch.Tensor  # (B,) class indices; -1 marks an unlabelled image
    indices: torch.Tensor  # (B,) positions in the training set
    seeds: torch.Tensor | None = None  # (B,) int64 augmentation seeds, for whole-batch augmentation

    def to(self, device: torch.device) -> Batch:
        """Images and labels on ``device``; the indices and seeds stay on the host.

        Both decide things on the host: the indices look up the teacher cache's
        flags, the seeds draw which augmentation each image gets. Reading them
        back from the device would make the host wait at every micro-batch.
        """
        images, labels = (part.to(device, non_blocking=True) for part in (self.images, self.labels))
        return Batch(images, labels, self.indices, self.seeds)


def collate_samples(samples: Sequence[tuple[torch.Tensor, int, int]]) -> Batch:
    """The per-image path's collate function: (image, label, index) samples into one ``Batch``."""
    images, labels, indices = default_collate(samples)
    return Batch(images, labels, indices)


def whole_batch(batch: Batch) -> Batch:
    """The whole-batch path's collate function: the data set's ``__getitems__`` already made the batch."""
    return batch
