"""Loaders: the data sets, their transforms and samplers, assembled into what a run iterates.

``build_data`` is the training run's (train and validation loaders, the unlabelled pool);
``build_eval_data``, ``build_probe_data`` and ``build_pool_for_labelling`` serve evaluation,
the linear probe and pseudo-labelling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from deit.data.batch import collate_samples, whole_batch
from deit.data.batched import BatchAugment, InMemoryBatches
from deit.data.datasets import (
    DataError,
    DatasetInfo,
    ImageFileDataset,
    TensorImageDataset,
    balanced_subset,
    load_datasets,
)
from deit.data.decoded import decode_once, decoded_size
from deit.data.rand_augment import BatchRandAugment, RandAugmentPolicy
from deit.data.samplers import EpochSampler, MixedEpochSampler, SeededSamples, ShardSampler
from deit.data.transforms import eval_transform, is_small_image, train_transform
from deit.data.unlabeled import build_pool, count_labeled

log = logging.getLogger("deit")


@dataclass(frozen=True)
class Unlabeled:
    """Where a run's unlabelled images come from and how many of each batch they fill."""

    label_fraction: float | None = None  # keep this stratified share of the training labels, the rest unlabelled
    path: str | None = None  # a folder of images added unlabelled
    ratio: float | None = None  # unlabelled share of each batch; None: their share of the pool
    selection: torch.Tensor | None = None  # pool indices to train on, repeats allowed (Noisy Student)
    fingerprint: str | None = None  # of the pool the selection was made for (see pool_fingerprint)

    def pool(self, train_set: Dataset, info: DatasetInfo, *, seed: int, bad_files: str) -> Dataset:
        return build_pool(
            train_set, info, seed=seed, label_fraction=self.label_fraction, unlabeled_path=self.path,
            bad_files=bad_files, selection=self.selection, fingerprint=self.fingerprint,
        )  # fmt: skip


@dataclass(frozen=True)
class DataBundle:
    train_loader: DataLoader  # yields this process's ``Batch`` records; set_epoch on train_sampler first
    train_sampler: EpochSampler | MixedEpochSampler
    val_loader: DataLoader  # this process's share of the validation set: each image on exactly one process
    info: DatasetInfo
    input_size: int
    # with whole-batch augmentation, the train loader yields uint8 images and their seeds for this to finish
    batch_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # BatchAugment, or views


def build_data(
    dataset: str,
    data_path: str | None,
    *,
    batch_size: int,
    seed: int,
    input_size: int | None = None,
    download: bool = False,
    in_chans: int | None = None,
    train_subset: int | None = None,
    num_workers: int = 0,
    hflip: float = 0.5,
    rand_augment: str | None = None,
    random_erasing: float = 0.0,
    repeated_aug: int = 1,
    eval_batch_size: int | None = None,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    bad_files: str = "error",
    batched: bool = True,
    decode_budget_gb: float = 0.0,
    decode_cache: str | None = None,
    views: int | None = None,
    unlabeled: Unlabeled | None = None,
) -> DataBundle:
    """Data sets with their transforms, in loaders for process ``rank`` of ``num_replicas``."""
    train_set, val_set, info = load_datasets(
        dataset, data_path, download=download, in_chans=in_chans, bad_files=bad_files
    )
    size = _input_size(info, input_size)
    val_set.transform = eval_transform(**_transform_stats(info, size))
    train_set = _training_pool(train_set, info, seed=seed, subset=train_subset, unlabeled=unlabeled, bad=bad_files)
    if batched and unlabeled is None:
        train_set = _decoded_if_it_fits(
            train_set, size, source=data_path, budget_gb=decode_budget_gb, cache=decode_cache
        )
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    base.transform = train_transform(
        hflip=hflip, rand_augment=rand_augment, random_erasing=random_erasing, **_transform_stats(info, size)
    )
    if len(train_set) < batch_size * num_replicas:
        raise DataError(
            f"the training set has {len(train_set)} images, fewer than one global batch of {batch_size * num_replicas}"
        )
    sampler = _train_sampler(
        train_set, unlabeled, batch_size=batch_size, repeated_aug=repeated_aug, views=views,
        num_replicas=num_replicas, rank=rank, seed=seed,
    )  # fmt: skip
    train_loader, batch_transform = _train_loader(
        train_set, sampler, info, size, batch_size=batch_size, batched=batched, hflip=hflip,
        rand_augment=rand_augment, random_erasing=random_erasing, workers=num_workers, pin=pin_memory,
    )  # fmt: skip
    val_sampler = ShardSampler(len(val_set), num_replicas=num_replicas, rank=rank)
    val_loader = _loader(val_set, eval_batch_size or 2 * batch_size, val_sampler, workers=num_workers, pin=pin_memory)
    return DataBundle(train_loader, sampler, val_loader, info, size, batch_transform)


def _train_loader(
    train_set: Dataset,
    sampler: Sampler,
    info: DatasetInfo,
    size: int,
    *,
    batch_size: int,
    batched: bool,
    hflip: float,
    rand_augment: str | None,
    random_erasing: float,
    workers: int,
    pin: bool,
) -> tuple[DataLoader, BatchAugment | None]:
    """The training loader, and the whole-batch augmentation that finishes its batches on the device (if any)."""
    if not (batched and _can_batch(train_set, size, rand_augment)):
        samples = SeededSamples(train_set)
        return _loader(samples, batch_size, sampler, workers=workers, pin=pin, collate=collate_samples), None
    # in-memory images, small-image recipe: gather uint8 batches, augment them whole on the device
    augment = BatchAugment(
        info.mean, info.std, padding=max(1, size // 8), hflip=hflip, random_erasing=random_erasing,
        rand_augment=_batch_rand_augment(rand_augment, info),
    )  # fmt: skip
    loader = DataLoader(
        InMemoryBatches(*_in_memory(train_set)), batch_size=batch_size, sampler=sampler, drop_last=True,
        collate_fn=whole_batch, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
    )  # fmt: skip
    return loader, augment


def _batch_rand_augment(policy: str | None, info: DatasetInfo) -> BatchRandAugment | None:
    """timm's RandAugment ``policy`` for whole uint8 batches, filling with the data set's mean colour."""
    if not policy:
        return None
    return BatchRandAugment(RandAugmentPolicy.parse(policy), tuple(round(255 * m) for m in info.mean))


def _train_sampler(
    train_set: Dataset,
    unlabeled: Unlabeled | None,
    *,
    batch_size: int,
    repeated_aug: int,
    views: int | None,
    num_replicas: int,
    rank: int,
    seed: int,
) -> EpochSampler | MixedEpochSampler:
    """The epoch order: every image once (or ``repeated_aug`` times), or batches of a set unlabelled share."""
    if unlabeled is not None and count_labeled(train_set) < len(train_set):
        if repeated_aug > 1 or views:
            raise DataError("unlabelled images work without repeated augmentation and without a teacher cache")
        labels = torch.as_tensor(train_set.targets)
        return MixedEpochSampler(
            labels, batch_size=batch_size, unlabeled_ratio=unlabeled.ratio, num_replicas=num_replicas, rank=rank,
            seed=seed,
        )  # fmt: skip
    return EpochSampler(
        len(train_set), repeats=repeated_aug, num_replicas=num_replicas, rank=rank, seed=seed, views=views
    )


def build_eval_data(
    dataset: str,
    data_path: str | None,
    *,
    batch_size: int,
    input_size: int | None = None,
    in_chans: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DatasetInfo]:
    """The validation loader alone, for evaluating a trained model."""
    _, val_set, info = load_datasets(dataset, data_path, in_chans=in_chans)
    val_set.transform = eval_transform(**_transform_stats(info, _input_size(info, input_size)))
    sampler = ShardSampler(len(val_set))
    return _loader(val_set, batch_size, sampler, workers=num_workers, pin=pin_memory), info


def build_probe_data(
    dataset: str,
    data_path: str | None,
    *,
    batch_size: int,
    input_size: int | None = None,
    in_chans: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    bad_files: str = "error",
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Unaugmented training and validation loaders, for features of a frozen backbone (the linear probe).

    With ``label_fraction``, the training loader holds that class-balanced share of the labelled images.
    """
    train_set, val_set, info = load_datasets(dataset, data_path, in_chans=in_chans, bad_files=bad_files)
    transform = eval_transform(**_transform_stats(info, _input_size(info, input_size)))
    train_set.transform = val_set.transform = transform
    if label_fraction is not None:
        if not 0 < label_fraction <= 1:
            raise DataError(f"--label-fraction must be in (0, 1], not {label_fraction}")
        keep = max(info.num_classes, round(label_fraction * len(train_set)))
        train_set = Subset(train_set, balanced_subset(train_set.targets, keep, seed))
    train_loader, val_loader = (
        _loader(part, batch_size, ShardSampler(len(part)), workers=0, pin=False) for part in (train_set, val_set)
    )
    return train_loader, val_loader, info


def build_pool_for_labelling(
    dataset: str,
    data_path: str | None,
    *,
    seed: int,
    unlabeled: Unlabeled,
    input_size: int | None = None,
    in_chans: int | None = None,
    train_subset: int | None = None,
    bad_files: str = "error",
) -> tuple[Dataset, DatasetInfo, int]:
    """The training pool a run with ``unlabeled`` would draw from, in order, with the evaluation transform.

    This is what a teacher pseudo-labels: clean images (no augmentation), the same pool index by index.
    """
    train_set, _, info = load_datasets(dataset, data_path, in_chans=in_chans, bad_files=bad_files)
    size = _input_size(info, input_size)
    pool = _training_pool(train_set, info, seed=seed, subset=train_subset, unlabeled=unlabeled, bad=bad_files)
    pool.transform = eval_transform(**_transform_stats(info, size))
    return pool, info, size


def _training_pool(
    train_set: Dataset, info: DatasetInfo, *, seed: int, subset: int | None, unlabeled: Unlabeled | None, bad: str
) -> Dataset:
    if subset is not None:
        train_set = Subset(train_set, balanced_subset(train_set.targets, subset, seed))
    if unlabeled is not None:
        train_set = unlabeled.pool(train_set, info, seed=seed, bad_files=bad)
    return train_set


def _can_batch(dataset: Dataset, size: int, rand_augment: str | None) -> bool:
    """In-memory images at the input size, and a RandAugment policy (if any) that the whole-batch ops draw."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    drawable = rand_augment is None or RandAugmentPolicy.parse(rand_augment) is not None
    return isinstance(base, TensorImageDataset) and drawable and base.images.shape[-1] == size


def _decoded_if_it_fits(
    pool: Dataset, size: int, *, source: str | None, budget_gb: float, cache: str | None
) -> Dataset:
    """A training pool of small image files within the budget, decoded once (``data.decoded``); else ``pool``."""
    base = pool.dataset if isinstance(pool, Subset) else pool
    if not isinstance(base, ImageFileDataset) or not is_small_image(size) or budget_gb <= 0 or source is None:
        return pool
    files = ImageFileDataset([base.samples[i] for i in pool.indices], base.in_chans) if pool is not base else base
    needed = decoded_size(files, size) / 2**30
    if needed > budget_gb:
        log.info("%d images would take %.1f GB decoded, over --decode-budget-gb %g: read image by image",
                 len(files), needed, budget_gb)  # fmt: skip
        return pool
    return decode_once(files, size, source=source, cache_dir=Path(cache).expanduser() if cache else None)


def _in_memory(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices)
        return dataset.dataset.images[indices], dataset.dataset.labels[indices]
    return dataset.images, dataset.labels


def _input_size(info: DatasetInfo, input_size: int | None) -> int:
    size = input_size or info.native_size
    if size is None:
        raise DataError(f"{info.name} images have no common size: give --input-size")
    return size


def _transform_stats(info: DatasetInfo, input_size: int) -> dict:
    return {"mean": info.mean, "std": info.std, "native_size": info.native_size, "input_size": input_size}


def _loader(
    dataset: Dataset, batch_size: int, sampler: Sampler, *, workers: int, pin: bool, collate: Callable | None = None
) -> DataLoader:
    """A training loader when ``collate`` makes ``Batch`` records; an evaluation loader of (images, labels) without."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=collate is not None,  # equal-sized training batches on every process; evaluation sees every image
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
