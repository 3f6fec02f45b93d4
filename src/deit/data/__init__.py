"""Data: data sets, transform presets and loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from deit.data.datasets import (
    DATASET_ALIASES,
    DataError,
    DatasetInfo,
    balanced_subset,
    canonical_dataset_name,
    load_datasets,
)
from deit.data.samplers import RepeatedAugmentationSampler
from deit.data.transforms import eval_transform, train_transform

__all__ = [
    "DATASET_ALIASES",
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "build_data",
    "build_eval_data",
    "canonical_dataset_name",
    "load_datasets",
]


@dataclass(frozen=True)
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    info: DatasetInfo
    input_size: int


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
) -> DataBundle:
    """Data sets with their transforms, wrapped in seeded loaders."""
    train_set, val_set, info = load_datasets(dataset, data_path, download=download, in_chans=in_chans)
    size = _input_size(info, input_size)
    train_set.transform = train_transform(
        hflip=hflip, rand_augment=rand_augment, random_erasing=random_erasing, **_transform_stats(info, size)
    )
    val_set.transform = eval_transform(**_transform_stats(info, size))
    if train_subset is not None:
        train_set = Subset(train_set, balanced_subset(train_set.targets, train_subset, seed))
    if len(train_set) < batch_size:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch of {batch_size}")
    sampler = RepeatedAugmentationSampler(len(train_set), repeated_aug, seed=seed) if repeated_aug > 1 else None
    train_loader = _loader(
        train_set, batch_size, shuffle=True, seed=seed, workers=num_workers, pin=pin_memory, sampler=sampler
    )
    val_loader = _loader(
        val_set, eval_batch_size or 2 * batch_size, shuffle=False, seed=seed, workers=num_workers, pin=pin_memory
    )
    return DataBundle(train_loader, val_loader, info, size)


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
    return _loader(val_set, batch_size, shuffle=False, seed=0, workers=num_workers, pin=pin_memory), info


def _input_size(info: DatasetInfo, input_size: int | None) -> int:
    size = input_size or info.native_size
    if size is None:
        raise DataError(f"{info.name} images have no common size: give --input-size")
    return size


def _transform_stats(info: DatasetInfo, input_size: int) -> dict:
    return {"mean": info.mean, "std": info.std, "native_size": info.native_size, "input_size": input_size}


def _loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int,
    pin: bool,
    sampler: Sampler | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=shuffle,  # equal-sized training batches; evaluation sees every image
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
