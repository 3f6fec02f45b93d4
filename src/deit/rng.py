"""Reproducibility without hidden state: every random draw of a run is seeded from counters.

A run draws random numbers in two places, and both are reseeded from the run's
seed and where the run is, never carried over from earlier draws:

* data augmentation, per sample, from (seed, epoch, position in the epoch)
  (see ``data.samplers``);
* the training step (Mixup / CutMix, stochastic depth, dropout), per
  micro-batch, from (seed, optimizer step, micro-batch, process rank).

So a checkpoint needs no generator states: (epoch, step) is the whole random
state. A run resumed from any step, with any number of data-loader workers,
repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*counters: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    low, high = np.random.SeedSequence([abs(int(c)) for c in counters]).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices), e.g. before building a model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, step: int, micro_batch: int, rank: int) -> None:
    """Seed every generator a training micro-batch draws from (model dropout, Mixup's numpy draws)."""
    seed_everything(derive_seed(seed, step, micro_batch, rank))
