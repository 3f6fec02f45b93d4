"""Data sets: Fashion-MNIST, CIFAR-10/100 and any ImageFolder tree.

Small data sets are held in memory as uint8 tensors (N, C, H, W); folders are
read image by image. ``load_datasets`` returns the train and validation sets
with a ``DatasetInfo`` that says what the model must match: class count and
names, channels, normalisation and native image size.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from deit.errors import DeitError

log = logging.getLogger("deit")

# Accepted --data-set values; CIFAR and IMNET are the official code's names (its CIFAR is CIFAR-100).
DATASET_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "CIFAR": "cifar100",
    "imagefolder": "imagefolder",
    "IMNET": "imagefolder",
    "unlabeled": "unlabeled",  # any folder of images, nested or not, without labels: for deit pretrain
    "unlabelled": "unlabeled",
    "imagenet": "imagefolder",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_STATS = {  # per-channel mean and std of the training images, in [0, 1]
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "unlabeled": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
UNLABELED = -1  # the label of an image without one: the losses ignore it (see deit.data.unlabeled)


class DataError(DeitError, ValueError):
    """The data is missing, laid out wrongly, or unreadable; the message says where."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: int | None  # side of every image, when they all share one (None for folders)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W), with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class ImageFileDataset(Dataset):
    """Image files with integer labels, decoded on access; an unreadable file raises naming its path."""

    def __init__(self, samples: Sequence[tuple[Path, int]], in_chans: int, transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, label = self.samples[index]
        image = load_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def load_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode an image file to ``mode`` (palette, CMYK, grayscale and alpha images are converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # avoids PIL's warning and keeps the palette's alpha meaning
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def decode_to_size(path: Path, in_chans: int, size: int) -> torch.Tensor:
    """An image file as uint8 (C, size, size): the shorter side resized (bicubic), the centre cropped."""
    image = load_image(path, "L" if in_chans == 1 else "RGB")
    if image.size != (size, size):
        scale = size / min(image.size)
        resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return array.view(size, size, in_chans).permute(2, 0, 1).contiguous()


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (empty, truncated, not an image), or None if it decodes."""
    try:
        load_image(path)
    except DataError as error:
        return str(error.__cause__ or error)
    return None


def find_unreadable(root: str | Path) -> tuple[int, list[tuple[Path, str]]]:
    """Decode every image file under ``root``; returns (files checked, [(path, reason) of the unreadable])."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder")
    files = _image_files(root)
    problems = [(path, reason) for path in files if (reason := unreadable_reason(path)) is not None]
    return len(files), problems


def _readable(samples: list[tuple[Path, int]], split: str) -> list[tuple[Path, int]]:
    kept, skipped = [], []
    for path, label in samples:
        (kept if unreadable_reason(path) is None else skipped).append((path, label))
    if skipped:
        names = [str(path) for path, _ in skipped[:10]]
        log.warning("--bad-files skip: left out %d unreadable %s images: %s", len(skipped), split, names)
    if not kept:
        raise DataError(f"no readable images in the {split} split")
    return kept


def canonical_dataset_name(name: str) -> str:
    try:
        return DATASET_ALIASES[name] if name in DATASET_ALIASES else DATASET_ALIASES[name.lower()]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(set(DATASET_ALIASES))}") from None


# --- Fashion-MNIST -------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, file holds {body.size} values")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_path: str | None) -> Path | None:
    """The folder holding the four Fashion-MNIST IDX files, or None."""
    candidates = []
    if data_path:
        root = Path(data_path)
        candidates += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    else:
        candidates.append(DEBIAN_FASHION_MNIST)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in stems):
            return folder
    return None


def load_fashion_mnist(data_path: str | None, download: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    folder = find_fashion_mnist(data_path)
    if folder is None and download:
        from torchvision.datasets import FashionMNIST

        root = Path(data_path or Path.home() / ".cache" / "deit")
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        folder = find_fashion_mnist(str(root))
    if folder is None:
        where = data_path or DEBIAN_FASHION_MNIST
        raise DataError(
            f"Fashion-MNIST not found in {where}: expected train-images-idx3-ubyte[.gz] and the other three IDX "
            "files. Install Debian's dataset-fashion-mnist package, point --data-path at the files, or add --download"
        )

    def split(prefix: str) -> TensorImageDataset:
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        return TensorImageDataset(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )

    return split("train"), split("t10k")


# --- CIFAR ---------------------------------------------------------------------------------------


def load_cifar(
    name: str, data_path: str | None, download: bool
) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    root = Path(data_path or Path.home() / ".cache" / "deit")
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(str(root), train=train, download=download)
        except RuntimeError as error:
            raise DataError(
                f"{name} not found in {root} (torchvision's format, e.g. {root}/{dataset_class.base_folder}); "
                f"add --download to fetch it ({error})"
            ) from error
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        splits.append(TensorImageDataset(images, torch.tensor(dataset.targets)))
    return splits[0], splits[1], list(dataset.classes)


# --- ImageFolder trees ---------------------------------------------------------------------------


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _unlabeled_files(root: Path) -> list[tuple[Path, int]]:
    """Every image under ``root``, at any depth, labelled ``UNLABELED``: a folder for self-supervised pretraining."""
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder")
    files = _image_files(root)
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}), at any depth")
    return [(path, UNLABELED) for path in files]


def scan_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and (path, label) samples of ``root/train`` and ``root/val``, checked for layout."""
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder")
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"{root} is not an ImageFolder tree: missing {' and '.join(missing)}/. Expected {root}/train/<class>/*.jpg "
            f"and {root}/val/<class>/*.jpg; found {found}"
        )
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"{root}/train has no class folders: put each class's images in {root}/train/<class name>/")
    val_classes = _class_folders(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(
            f"train and val class folders differ in {root}: only in train {only_train}, only in val {only_val}"
        )
    samples = {}
    for split in ("train", "val"):
        samples[split] = []
        for label, name in enumerate(classes):
            files = _image_files(root / split / name)
            if not files:
                raise DataError(f"class folder {root / split / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples[split] += [(path, label) for path in files]
    return classes, samples


# --- entry point ---------------------------------------------------------------------------------


BAD_FILE_POLICIES = ("error", "skip")


def load_datasets(
    name: str,
    data_path: str | None = None,
    *,
    download: bool = False,
    in_chans: int | None = None,
    bad_files: str = "error",
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """The train and validation sets (without transforms) and what a model needs to know about them.

    ``bad_files="error"`` lets an unreadable image raise when it is read, naming
    its path; ``"skip"`` reads every image file first and leaves the unreadable
    ones out, before any sampling, so every process sees the same data set.
    """
    if bad_files not in BAD_FILE_POLICIES:
        raise DataError(f"unknown bad-file policy {bad_files!r}; choose one of {BAD_FILE_POLICIES}")
    name = canonical_dataset_name(name)
    if data_path is not None and not download and not Path(data_path).exists():
        raise DataError(f"data path {data_path} does not exist")
    mean, std = _STATS[name]
    if name == "fashion-mnist":
        train, val = load_fashion_mnist(data_path, download)
        classes, native_size, channels = list(FASHION_MNIST_CLASSES), 28, 1
    elif name in ("cifar10", "cifar100"):
        train, val, classes = load_cifar(name, data_path, download)
        native_size, channels = 32, 3
    else:
        if data_path is None:
            raise DataError("an ImageFolder data set needs --data-path pointing at a folder with train/ and val/")
        channels = in_chans or 3
        if name == "unlabeled":
            classes, samples = ["unlabelled"], {"train": _unlabeled_files(Path(data_path)), "val": []}
        else:
            classes, samples = scan_image_folder(Path(data_path))
        if bad_files == "skip":
            samples = {split: _readable(files, split) if files else [] for split, files in samples.items()}
        train = ImageFileDataset(samples["train"], channels)
        val = ImageFileDataset(samples["val"], channels)
        native_size = None
        if channels != len(mean):
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    info = DatasetInfo(name, tuple(classes), channels, tuple(mean), tuple(std), native_size)
    return train, val, info


def balanced_subset(labels: Sequence[int], size: int, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``size`` samples with the classes as balanced as possible."""
    labels = torch.as_tensor(labels)
    if not 0 < size <= len(labels):
        raise DataError(f"cannot take a subset of {size} from {len(labels)} training images")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # rank each sample within its class in the shuffled order, then take the lowest ranks first
    rank_in_class = torch.empty_like(order)
    for cls in labels.unique():
        members = order[labels[order] == cls]
        rank_in_class[members] = torch.arange(len(members))
    chosen = sorted(order.tolist(), key=lambda i: int(rank_in_class[i]))[:size]  # stable: ties stay shuffled
    return sorted(chosen)
