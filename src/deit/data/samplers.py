"""Samplers: the order of an epoch, shared by any number of processes, with a seed for every sample.

``EpochSampler`` draws one global order per (seed, epoch) and deals it out to
the processes: process ``r`` of ``w`` takes positions ``r, r + w, ...``, so the
union of the processes' i-th batches is always the same set of images,
whatever the number of processes. Each position also carries its own
augmentation seed (see ``SeededSamples``): an image's crop, flip, RandAugment
and erasing depend on (seed, epoch, position) only, not on the process, the
data-loader worker or what ran before. That is what makes a resumed run, a
run with more workers, and a 2-process run repeat a 1-process run exactly.

Repeated augmentation (Hoffer et al. 2020; Berman et al. 2019) puts several
copies of each drawn image in the epoch, each with its own seed, so each is
augmented anew. The epoch keeps the data set's length, as in the paper: with
3 repeats it sees a third of the images, three times each. Unlike the
official code it also repeats on one process, where the copies sit next to
each other in a batch; with several processes they go to different processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from deit.data.datasets import DataError
from deit.rng import derive_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` for this process's share of the epoch."""

    def __init__(
        self,
        dataset_size: int,
        *,
        repeats: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        views: int | None = None,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        group = repeats * num_replicas
        if dataset_size < group:
            raise DataError(f"{dataset_size} images are too few for {repeats} repeats on {num_replicas} processes")
        self.dataset_size = dataset_size
        self.repeats = repeats
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.views = views  # fixed augmented views per image, cycled over epochs (the teacher cache's)
        self.epoch = 0
        self.start = 0
        self.weights: torch.Tensor | None = None  # see draw_by
        # the whole epoch, all processes together: the data set's length, cut to whole groups of copies
        self.total_size = dataset_size // group * group
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw ``epoch``'s order; skip this process's first ``start`` samples (to resume inside an epoch)."""
        self.epoch = epoch
        self.start = start

    def draw_by(self, weights: torch.Tensor | None) -> None:
        """From now on, draw each epoch's images with replacement, image i with probability proportional to
        ``weights[i]`` (DeepCluster: the same share for each cluster); None: every image once, in a random order.

        The draw depends on (seed, epoch, weights) only, so processes given the same weights agree, and a resumed
        epoch given them again repeats itself.
        """
        if weights is not None and (weights.shape != (self.dataset_size,) or not bool((weights >= 0).all())):
            raise ValueError(f"weights must be {self.dataset_size} non-negative numbers, one per image")
        if weights is not None and not bool((weights > 0).any()):
            raise ValueError("weights must not all be zero")
        self.weights = None if weights is None else weights.detach().double().cpu()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.dataset_size, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=generator)  # one per position
        repeated = order.repeat_interleave(self.repeats)[: self.total_size]  # a a a b b b ...
        if self.views:  # one seed per (image, view) instead: epoch e shows view e mod views of each image
            view_generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch % self.views, 1))
            seeds = torch.randint(0, 2**62, (self.dataset_size,), generator=view_generator)[repeated]
        mine = slice(self.rank + self.start * self.num_replicas, None, self.num_replicas)
        return zip(repeated[mine].tolist(), seeds[mine].tolist(), strict=True)

    def __len__(self) -> int:
        """The whole epoch's share, also when resuming inside it (the loop counts the skipped batches)."""
        return self.num_samples


class MixedEpochSampler(Sampler[tuple[int, int]]):
    """An epoch whose every batch holds a set number of labelled and unlabelled images.

    ``labels`` marks the unlabelled images with a negative label. Each batch of
    ``batch_size`` takes ``round(batch_size * unlabeled_ratio)`` unlabelled
    images (default ratio: the pool's own share) and labelled ones for the rest,
    each kind drawn from its own stream: a seeded shuffle of that kind's
    images, reshuffled whenever it runs out, so 600 labelled images among
    60,000 are each seen many times per epoch. The epoch has as many batches
    as the whole pool fills, and is dealt out to processes as ``EpochSampler``
    deals its order: each global batch is all processes' labelled images, then
    their unlabelled ones, and process ``r`` takes positions ``r, r + w, ...``.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        *,
        batch_size: int,
        unlabeled_ratio: float | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels)
        self.labeled = (labels >= 0).nonzero().flatten()
        self.unlabeled = (labels < 0).nonzero().flatten()
        if unlabeled_ratio is None:
            unlabeled_ratio = len(self.unlabeled) / len(labels)
        if not 0 <= unlabeled_ratio < 1:
            raise ValueError(f"the unlabelled share of a batch must be in [0, 1), got {unlabeled_ratio}")
        self.per_batch_unlabeled = round(batch_size * unlabeled_ratio) if len(self.unlabeled) else 0
        self.per_batch_labeled = batch_size - self.per_batch_unlabeled
        if self.per_batch_labeled == 0 or len(self.labeled) == 0:
            raise DataError(f"batches of {batch_size} with {unlabeled_ratio:.3f} unlabelled hold no labelled image")
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.batches = len(labels) // (batch_size * num_replicas)
        if self.batches == 0:
            raise DataError(f"{len(labels)} images do not fill one batch of {batch_size} on {num_replicas} processes")
        self.total_size = self.batches * batch_size * num_replicas
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _stream(self, members: torch.Tensor, length: int, kind: int) -> torch.Tensor:
        passes = -(-length // len(members)) if length else 0
        shuffles = [
            members[torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))]
            for seed in (derive_seed(self.seed, self.epoch, kind, p) for p in range(passes))
        ]
        return torch.cat(shuffles)[:length] if shuffles else members[:0]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        w = self.num_replicas
        labeled = self._stream(self.labeled, self.batches * self.per_batch_labeled * w, 2)
        unlabeled = self._stream(self.unlabeled, self.batches * self.per_batch_unlabeled * w, 3)
        # batch by batch: the labelled images of all processes, then their unlabelled ones
        blocks = [labeled.view(self.batches, self.per_batch_labeled * w)]
        blocks.append(unlabeled.view(self.batches, self.per_batch_unlabeled * w))
        order = torch.cat(blocks, dim=1).flatten()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=generator)
        mine = slice(self.rank + self.start * w, None, w)
        return zip(order[mine].tolist(), seeds[mine].tolist(), strict=True)

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Process ``rank`` of ``num_replicas`` takes every ``num_replicas``-th index: each image is seen exactly once."""

    def __init__(self, dataset_size: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, dataset_size, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """A data set read with ``(index, seed)`` keys: the transform's randomness is seeded by the key's seed.

    torchvision's transforms draw from torch's global generator, timm's
    RandAugment and Random Erasing from ``random`` and numpy's global state;
    all three are seeded before each sample. The training step reseeds them
    before it draws (see ``deit.rng.seed_step``), so nothing leaks across.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[object, int, int]:
        """The image, its label and its index in the data set (an indexed teacher looks its targets up by it)."""
        index, seed = key
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also touch CUDA, 30x slower
        random.seed(seed)
        np.random.seed(seed % 2**32)
        image, label = self.dataset[index]
        return image, label, index
