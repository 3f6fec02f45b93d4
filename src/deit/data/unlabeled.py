"""Training pools with unlabelled images: a fraction of the labels kept, a folder of images added.

An unlabelled image carries the label ``UNLABELED`` (-1) through the loader;
the loss ignores it for the label term and only the teacher's signal trains
the student on it (see ``deit.losses``). The pool keeps the training set's
type: in-memory sets stay uint8 tensors (an added folder is decoded and
resized to the set's native size once), image folders stay lists of files,
so every loader path and augmentation works unchanged.

``label_fraction_mask`` keeps a fraction of each class's labels, chosen by a
seeded shuffle: the same seed gives the same split on any machine and any
number of processes, and a smaller fraction's labelled images are a subset of
a larger one's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from deit.data.datasets import (
    IMAGE_EXTENSIONS,
    UNLABELED,
    DataError,
    DatasetInfo,
    ImageFileDataset,
    TensorImageDataset,
    _image_files,
    decode_to_size,
    unreadable_reason,
)

log = logging.getLogger("deit")


def label_fraction_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A boolean mask keeping ``fraction`` of each class's labels (at least one per class), seeded."""
    if not 0 < fraction <= 1:
        raise DataError(f"--label-fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    priority = torch.randperm(len(labels), generator=generator)  # one shuffle for all classes: nested fractions
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        members = members[priority[members].argsort()]
        keep[members[: max(1, round(fraction * len(members)))]] = True
    return keep


def build_pool(
    train_set: Dataset,
    info: DatasetInfo,
    *,
    seed: int,
    label_fraction: float | None = None,
    unlabeled_path: str | None = None,
    bad_files: str = "error",
    selection: torch.Tensor | None = None,
    fingerprint: str | None = None,
) -> Dataset:
    """The training set with the unlabelled images marked ``UNLABELED``, then reindexed by ``selection`` if given.

    ``selection`` lists pool indices to train on, repeats allowed (Noisy
    Student's filtered and class-balanced pool, see ``deit.pseudo_labels``),
    which was made for the pool whose ``pool_fingerprint`` is ``fingerprint``.
    """
    pool = _materialize(train_set)
    if label_fraction is not None and label_fraction < 1:
        labels = torch.as_tensor(pool.targets)
        keep = label_fraction_mask(labels, label_fraction, seed)
        pool = _relabel(pool, torch.where(keep, labels, UNLABELED))
        split_digest = hashlib.sha256(keep.nonzero().flatten().numpy().tobytes()).hexdigest()[:12]
        log.info(
            "--label-fraction %g: %d labelled images (per class %s), %d unlabelled; split %s (seed %d)",
            label_fraction, int(keep.sum()), torch.bincount(labels[keep]).tolist(), int((~keep).sum()),
            split_digest, seed,
        )  # fmt: skip
    if unlabeled_path is not None:
        pool = _append_folder(pool, info, Path(unlabeled_path), bad_files)
    if fingerprint is not None and fingerprint != pool_fingerprint(pool):
        raise DataError(
            f"the pseudo-labels were made for another training pool than this run's {len(pool)} images: another "
            "data set, --label-fraction, --unlabeled-data-path, --train-subset or seed"
        )
    if selection is not None:
        if len(selection) and (selection.min() < 0 or selection.max() >= len(pool)):
            raise DataError(f"the pseudo-label selection indexes past the training pool of {len(pool)} images")
        pool = _reindex(pool, selection)
    return pool


def pool_fingerprint(dataset: Dataset) -> str:
    """A digest of a pool's images (pixels, or file paths) and labels, in order: pseudo-labels are tied to it."""
    digest = hashlib.sha256()
    if isinstance(dataset, TensorImageDataset):
        digest.update(dataset.images.numpy().tobytes())
    else:
        digest.update("\n".join(str(path) for path, _ in dataset.samples).encode())  # type: ignore[attr-defined]
    digest.update(torch.as_tensor(dataset.targets, dtype=torch.int64).numpy().tobytes())  # type: ignore[attr-defined]
    return digest.hexdigest()


def count_labeled(dataset: Dataset) -> int:
    return sum(1 for label in dataset.targets if label != UNLABELED)  # type: ignore[attr-defined]


def _materialize(dataset: Dataset) -> TensorImageDataset | ImageFileDataset:
    if isinstance(dataset, Subset):
        return _reindex(dataset.dataset, torch.as_tensor(dataset.indices))
    if not isinstance(dataset, TensorImageDataset | ImageFileDataset):
        raise DataError(f"unlabelled images need an in-memory or image-folder training set, not {type(dataset)}")
    return dataset


def _reindex(dataset: Dataset, indices: torch.Tensor) -> TensorImageDataset | ImageFileDataset:
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[indices], dataset.labels[indices])
    assert isinstance(dataset, ImageFileDataset)
    return _files_like(dataset, [dataset.samples[i] for i in indices.tolist()])


def _relabel(dataset: Dataset, labels: torch.Tensor) -> TensorImageDataset | ImageFileDataset:
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images, labels)
    assert isinstance(dataset, ImageFileDataset)
    return _files_like(dataset, [(path, int(label)) for (path, _), label in zip(dataset.samples, labels, strict=True)])


def _files_like(dataset: ImageFileDataset, samples: list[tuple[Path, int]]) -> ImageFileDataset:
    return ImageFileDataset(samples, in_chans=dataset.in_chans)


def _append_folder(pool: Dataset, info: DatasetInfo, folder: Path, bad_files: str) -> Dataset:
    """``pool`` followed by every image under ``folder`` (class subfolders or not: labels are ignored)."""
    if not folder.is_dir():
        raise DataError(f"unlabelled data path {folder} does not exist or is not a folder")
    files = _image_files(folder)
    if bad_files == "skip":
        readable = [path for path in files if unreadable_reason(path) is None]
        if len(readable) < len(files):
            skipped = sorted(set(files) - set(readable))
            names = [str(path) for path in skipped[:10]]
            log.warning("--bad-files skip: left out %d unreadable unlabelled images: %s", len(skipped), names)
        files = readable
    if not files:
        raise DataError(f"unlabelled data path {folder} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    log.info("added %d unlabelled images from %s", len(files), folder)
    if isinstance(pool, TensorImageDataset):
        assert info.native_size is not None
        images = torch.stack([decode_to_size(path, info.in_chans, info.native_size) for path in files])
        labels = torch.full((len(files),), UNLABELED, dtype=torch.long)
        return TensorImageDataset(torch.cat([pool.images, images]), torch.cat([pool.labels, labels]))
    assert isinstance(pool, ImageFileDataset)
    return _files_like(pool, pool.samples + [(path, UNLABELED) for path in files])
