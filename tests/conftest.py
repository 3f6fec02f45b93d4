"""Shared fixtures: a factory for tiny ImageFolder trees, Fashion-MNIST availability, fast model init."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One intra-op thread: the test models are tiny, so a second thread buys little when the machine is idle,
# and when another process keeps both cores busy (a `deit demo` next to the tests) two spinning OpenMP
# threads make each step 30x slower. DEIT_TEST_THREADS=2 restores torch's default on a 2-core machine.
torch.set_num_threads(int(os.environ.get("DEIT_TEST_THREADS", "1")))

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
HAVE_FASHION_MNIST = all((FASHION_MNIST_DIR / name).is_file() for name in FASHION_MNIST_FILES)

# Use as a decorator: the test reads Debian's copy of Fashion-MNIST (installed by `make data`).
needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST,
    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)

# (PIL mode, file suffix, PIL format) of the images written by make_image_folder, cycled per class folder
IMAGE_KINDS: tuple[tuple[str, str, str], ...] = (
    ("RGB", ".png", "PNG"),
    ("L", ".png", "PNG"),
    ("P", ".png", "PNG"),  # palette with a transparent index
    ("CMYK", ".jpg", "JPEG"),
    ("RGBA", ".png", "PNG"),
    ("RGB", ".jpeg", "JPEG"),
)


def write_image(path: Path, mode: str, fmt: str, size: tuple[int, int], seed: int) -> None:
    """A random image of ``mode`` saved as ``fmt``."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L").convert("P")
        image.putpalette([int(v) for v in rng.integers(0, 256, 768)])
        image.save(path, fmt, transparency=0)
        return
    bands = len(mode)  # RGB, RGBA, CMYK, L
    array = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    image = (
        Image.fromarray(array[..., 0], mode="L")
        if mode == "L"
        else Image.fromarray(array, mode="RGBA" if bands == 4 else "RGB")
    )
    if mode == "CMYK":
        image = image.convert("RGB").convert("CMYK")
    image.save(path, fmt)


ImageFolderFactory = Callable[..., Path]


@pytest.fixture
def make_image_folder(tmp_path: Path) -> ImageFolderFactory:
    """Build ``root/{train,val}/<class>/*`` under tmp_path with images of mixed modes and sizes.

    ``make_image_folder(classes=("cat", "dog"), per_class={"train": 4, "val": 2})`` returns the root.
    Sizes vary between images (so the data set has no common size); modes cycle through IMAGE_KINDS.
    """
    counter = iter(range(10**6))

    def factory(
        classes: Sequence[str] = ("ant", "bee", "cat"),
        per_class: dict[str, int] | None = None,
        splits: Sequence[str] = ("train", "val"),
        name: str = "folder",
    ) -> Path:
        per_class = per_class or {"train": 4, "val": 2}
        root = tmp_path / name
        for split in splits:
            for class_index, class_name in enumerate(classes):
                folder = root / split / class_name
                folder.mkdir(parents=True)
                for i in range(per_class[split]):
                    n = next(counter)
                    mode, suffix, fmt = IMAGE_KINDS[(class_index + i) % len(IMAGE_KINDS)]
                    size = (20 + 3 * (n % 5), 18 + 2 * (n % 7))
                    write_image(folder / f"img{i}{suffix}", mode, fmt, size, seed=n)
        return root

    return factory


@pytest.fixture
def fast_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip torch's slow truncated-normal init (about 1.5 s per ViT-Ti on CPU).

    Only for tests that overwrite every weight (load_state_dict) or only count parameters.
    """

    def normal_(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(0, 0.02)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", normal_)
