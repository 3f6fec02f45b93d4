"""Samplers: repeated augmentation, on one process or many.

Repeated augmentation (Hoffer et al. 2020; Berman et al. 2019) puts several
copies of each sampled image in the same global batch, each augmented anew.
The epoch keeps the data set's length, as in the paper: with 3 repeats an
epoch sees a third of the images, three times each.

Unlike the official code, it also repeats on a single process, where the
copies sit next to each other in the batch; with several processes the copies
of one image go to different processes, which together make the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class RepeatedAugmentationSampler(Sampler[int]):
    def __init__(
        self,
        dataset_size: int,
        repeats: int = 3,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        group = repeats * num_replicas
        if dataset_size < group:
            raise ValueError(f"{dataset_size} images are too few for {repeats} repeats on {num_replicas} processes")
        self.dataset_size = dataset_size
        self.repeats = repeats
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        # the whole epoch, all processes together: the data set's length, cut to whole groups of copies
        self.total_size = dataset_size // group * group
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws a new order; the same (seed, epoch) always gives the same one."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        repeated = order.repeat_interleave(self.repeats)[: self.total_size]  # a a a b b b ...
        return iter(repeated[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
