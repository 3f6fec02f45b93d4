"""Decode-once image folders: a small-image folder decoded and resized once, then trained from memory.

A folder of small images (at most 64 px once resized) that fits a memory
budget is decoded once into a uint8 array (N, C, S, S). The shorter side is
resized to S (bicubic) and the centre cropped, as the per-image transform
does. The training set then takes the in-memory path: whole-batch
augmentation on the device, no decoding per epoch, no loader workers needed.

With ``--decode-cache DIR`` the array is also kept on disk, under ``DIR``, as
a ``.npy`` file that later runs open memory-mapped. Its name holds a digest of what it was made
from: every file's path, size, modification time and label, the side S and
the channel count. A changed folder therefore gets a new file. Older files
of the same folder are removed when the new one is written. Unreadable files
follow ``--bad-files`` before this point (``error`` names the file, ``skip``
has already left it out).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from deit.data.datasets import ImageFileDataset, TensorImageDataset, decode_to_size
from deit.files import atomic_path

log = logging.getLogger("deit")


def decoded_size(dataset: ImageFileDataset, size: int) -> int:
    """Bytes the decoded array of ``dataset`` at ``size`` px takes."""
    return len(dataset) * dataset.in_chans * size * size


def decode_once(
    dataset: ImageFileDataset, size: int, *, source: str | Path, cache_dir: Path | None
) -> TensorImageDataset:
    """``dataset``'s images as one uint8 (N, C, size, size) tensor, read from the cache when it matches.

    ``source`` is the data folder they come from: its later versions replace this one's cache file.
    """
    channels = dataset.in_chans
    folder_tag = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:12]
    cached = cache_dir / f"{folder_tag}-{_digest(dataset, size)}.npy" if cache_dir is not None else None
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if cached is not None and cached.is_file():
        log.info("decoded images of %s read from %s", source, cached)
        array = np.load(cached, mmap_mode="c")  # copy-on-write: pages load on first use, the file stays as it is
        return TensorImageDataset(torch.from_numpy(array), labels)
    log.info("decoding %d images of %s once, at %d px", len(dataset), source, size)
    images = torch.empty(len(dataset), channels, size, size, dtype=torch.uint8)
    for index, (path, _) in enumerate(dataset.samples):
        images[index] = decode_to_size(path, channels, size)  # an unreadable file raises, naming itself
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp, open(tmp, "wb") as file:
            np.save(file, images.numpy())
        for stale in cached.parent.glob(f"{folder_tag}-*.npy"):
            if stale != cached:
                stale.unlink(missing_ok=True)
        log.info("kept the decoded images in %s for later runs", cached)
    return TensorImageDataset(images, labels)


def _digest(dataset: ImageFileDataset, size: int) -> str:
    digest = hashlib.sha256(f"{size} px, {dataset.in_chans} channels\n".encode())
    for path, label in dataset.samples:
        status = Path(path).stat()
        digest.update(f"{path}\t{status.st_size}\t{status.st_mtime_ns}\t{label}\n".encode())
    return digest.hexdigest()[:24]
