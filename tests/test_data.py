"""Data: IDX files, Fashion-MNIST, ImageFolder trees and their errors, subsets, loaders."""

from __future__ import annotations

import gzip
import math
import statistics
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fashion_mnist, write_image
from deit.data import Batch, DataError, build_data, canonical_dataset_name, load_datasets
from deit.data.batched import BatchAugment
from deit.data.datasets import FASHION_MNIST_CLASSES, ImageFileDataset, balanced_subset, load_image, read_idx

# --- IDX files -----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 3], dtype=np.uint8)
    for name, array in (("images", images), ("labels", labels)):
        path = tmp_path / (f"{name}.gz" if gz else name)
        data = idx_bytes(array)
        path.write_bytes(gzip.compress(data) if gz else data)
        got = read_idx(path)
        assert got.shape == array.shape and got.dtype == np.uint8
        assert np.array_equal(got, array)


def test_truncated_idx_body_raises(tmp_path):
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_truncated_idx_header_raises(tmp_path):
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0]))
    with pytest.raises(DataError):
        read_idx(path)


def test_non_idx_file_raises(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"PK\x03\x04 zip, not IDX")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(path)


# --- Fashion-MNIST -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist():
    return load_datasets("fashion-mnist")


@needs_fashion_mnist
def test_fashion_mnist_from_debian_path(fashion_mnist):
    train, val, info = fashion_mnist
    assert (len(train), len(val)) == (60000, 10000)
    assert info.name == "fashion-mnist"
    assert info.num_classes == 10 and info.class_names == FASHION_MNIST_CLASSES
    assert info.in_chans == 1 and info.native_size == 28
    assert len(info.mean) == len(info.std) == 1
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert 0 <= label < 10
    assert Counter(val.targets) == dict.fromkeys(range(10), 1000)  # the test set is balanced


@needs_fashion_mnist
def test_fashion_mnist_aliases(fashion_mnist):
    _, _, info = load_datasets("fmnist")
    assert info == fashion_mnist[2]


def test_fashion_mnist_missing_folder_raises(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        load_datasets("fashion-mnist", str(tmp_path))


# --- ImageFolder ---------------------------------------------------------------------------------


def test_image_folder_loads_mixed_modes(make_image_folder):
    root = make_image_folder(classes=("ant", "bee", "cat"), per_class={"train": 6, "val": 2})
    train, val, info = load_datasets("imagefolder", str(root))
    assert info.class_names == ("ant", "bee", "cat")
    assert (len(train), len(val)) == (18, 6)
    assert info.in_chans == 3 and info.native_size is None
    assert sorted(Counter(train.targets).items()) == [(0, 6), (1, 6), (2, 6)]
    for index in range(len(train)):  # RGB, L, P with transparency, CMYK JPEG, RGBA: all decode to RGB
        image, label = train[index]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert train.samples[index][0].parent.name == info.class_names[label]


def test_image_folder_as_grayscale(make_image_folder):
    root = make_image_folder()
    train, _, info = load_datasets("IMNET", str(root), in_chans=1)
    assert info.name == "imagefolder" and info.in_chans == 1
    assert len(info.mean) == len(info.std) == 1
    assert info.mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    assert all(train[i][0].mode == "L" for i in range(len(train)))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA"])
def test_load_image_converts_every_mode(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    write_image(path, mode, "JPEG" if mode == "CMYK" else "PNG", (9, 7), seed=1)
    with Image.open(path) as original:
        assert original.mode == mode
    rgb, gray = load_image(path, "RGB"), load_image(path, "L")
    assert rgb.mode == "RGB" and rgb.size == (9, 7)
    assert gray.mode == "L" and gray.size == (9, 7)


def test_hidden_folders_are_not_classes(make_image_folder):
    root = make_image_folder(classes=("a", "b"))
    for split in ("train", "val"):
        (root / split / ".cache").mkdir()
    assert load_datasets("imagefolder", str(root))[2].class_names == ("a", "b")


def test_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_datasets("imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="--data-path"):
        load_datasets("imagefolder", None)


def test_missing_val_raises(make_image_folder):
    root = make_image_folder(splits=("train",))
    with pytest.raises(DataError, match="val/"):
        load_datasets("imagefolder", str(root))


def test_class_mismatch_lists_the_difference(make_image_folder):
    root = make_image_folder(classes=("ant", "bee", "cat"))
    (root / "val" / "cat").rename(root / "val" / "cow")
    with pytest.raises(DataError) as error:
        load_datasets("imagefolder", str(root))
    message = str(error.value)
    assert "only in train ['cat']" in message and "only in val ['cow']" in message


def test_empty_class_folder_names_the_folder(make_image_folder):
    root = make_image_folder(classes=("ant", "bee"))
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=str(root / "train" / "empty")):
        load_datasets("imagefolder", str(root))


def test_train_without_class_folders_raises(tmp_path):
    (tmp_path / "root" / "train").mkdir(parents=True)
    (tmp_path / "root" / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_datasets("imagefolder", str(tmp_path / "root"))


def test_corrupt_image_raises_naming_the_path_when_read(make_image_folder):
    root = make_image_folder(classes=("ant", "bee"))
    bad = root / "train" / "ant" / "x.png"
    bad.write_bytes(b"not an image")
    train, _, _ = load_datasets("imagefolder", str(root))  # the scan only lists files
    index = next(i for i, (path, _) in enumerate(train.samples) if path == bad)
    with pytest.raises(DataError, match=str(bad)):
        train[index]
    train[(index + 1) % len(train)]  # the other images still read


def test_corrupt_image_stops_the_loader(make_image_folder):
    root = make_image_folder(classes=("ant", "bee"), per_class={"train": 4, "val": 2})
    (root / "val" / "bee" / "zz.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = build_data("imagefolder", str(root), batch_size=4, seed=0, input_size=16)
    with pytest.raises(DataError, match="zz.jpg"):
        list(data.val_loader)


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("IMNET", "imagefolder"),
        ("imagenet", "imagefolder"),
        ("CIFAR", "cifar100"),
        ("cifar10", "cifar10"),
        ("Fashion-MNIST", "fashion-mnist"),
        ("fashion_mnist", "fashion-mnist"),
    ],
)
def test_dataset_aliases(alias, canonical):
    assert canonical_dataset_name(alias) == canonical


def test_unknown_dataset_raises():
    with pytest.raises(DataError, match="mnist-digits"):
        canonical_dataset_name("mnist-digits")
    with pytest.raises(DataError, match="unknown data set"):
        load_datasets("mnist-digits")


# --- balanced subsets ----------------------------------------------------------------------------


def test_balanced_subset_is_seeded_sized_and_balanced():
    labels = [i % 10 for i in range(1000)]
    subset = balanced_subset(labels, 200, seed=3)
    assert len(subset) == 200 == len(set(subset))
    assert subset == sorted(subset)
    assert subset == balanced_subset(labels, 200, seed=3)
    assert subset != balanced_subset(labels, 200, seed=4)
    assert Counter(labels[i] for i in subset) == dict.fromkeys(range(10), 20)


def test_balanced_subset_of_imbalanced_labels():
    labels = [0] * 100 + [1] * 50 + [2] * 3
    subset = balanced_subset(labels, 31, seed=0)
    counts = Counter(labels[i] for i in subset)
    assert counts[2] == 3  # the rare class gives all it has
    assert abs(counts[0] - counts[1]) <= 1 and counts[0] + counts[1] == 28


def test_balanced_subset_uneven_size():
    labels = [i % 3 for i in range(30)]
    counts = Counter(labels[i] for i in balanced_subset(labels, 8, seed=1))
    assert sorted(counts.values()) == [2, 3, 3]


@pytest.mark.parametrize("size", [0, 31])
def test_balanced_subset_size_out_of_range(size):
    with pytest.raises(DataError):
        balanced_subset([0, 1] * 15, size, seed=0)


# --- loaders -------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_build_data_fashion_mnist():
    data = build_data("fashion-mnist", None, batch_size=64, seed=0, train_subset=256)
    assert data.input_size == 28 and data.info.num_classes == 10
    assert len(data.train_loader.dataset) == 256
    assert len(data.train_loader) == 4
    assert len(data.val_loader.dataset) == 10000
    batches = list(data.train_loader)  # whole-batch augmentation: uint8 images and seeds, finished below
    assert len(batches) == 4
    images = torch.cat([data.batch_transform(images, seeds) for images, _, seeds, _ in batches])
    labels = torch.cat([labels for _, labels, _, _ in batches])
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert sorted(Counter(labels.tolist()).values()) == [25] * 4 + [26] * 6  # the subset is class-balanced
    # normalised with the data set's statistics: black pixels map to -mean / std
    assert images.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-4)
    assert images.max().item() == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-4)
    assert abs(images.mean().item()) < 0.3 and 0.7 < images.std().item() < 1.3

    val_images, val_labels = next(iter(data.val_loader))
    assert val_images.shape == (128, 1, 28, 28)
    assert torch.equal(val_labels, torch.tensor(data.val_loader.dataset.targets[:128]))  # not shuffled


@needs_fashion_mnist
def test_build_data_is_seeded():
    first = next(iter(build_data("fashion-mnist", None, batch_size=64, seed=5, train_subset=128).train_loader))
    torch.manual_seed(123)  # the augmentations draw from torch's global generator
    again = next(iter(build_data("fashion-mnist", None, batch_size=64, seed=5, train_subset=128).train_loader))
    assert torch.equal(first[1], again[1])  # same subset, same shuffle


def test_build_data_image_folder(make_image_folder):
    root = make_image_folder(classes=("ant", "bee", "cat"), per_class={"train": 4, "val": 3})
    data = build_data("imagefolder", str(root), batch_size=4, seed=0, input_size=32)
    assert data.input_size == 32
    assert len(data.train_loader) == 3  # 12 images, drop_last
    for loader, batch in ((data.train_loader, 4), (data.val_loader, 8)):
        images, labels, *_ = next(iter(loader))  # training batches also carry each image's index
        assert images.shape == (batch, 3, 32, 32) and images.dtype == torch.float32
        assert set(labels.tolist()) <= {0, 1, 2}
        low = min((0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True))
        high = max((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True))
        assert low - 1e-4 <= images.min().item() and images.max().item() <= high + 1e-4
        assert images.std().item() > 0.3  # random pixels, normalised: not a constant image
    assert sum(len(labels) for _, labels in data.val_loader) == 9  # evaluation sees every image


def test_build_data_image_folder_grayscale_and_large(make_image_folder):
    root = make_image_folder(classes=("a", "b"), per_class={"train": 2, "val": 1})
    data = build_data("imagefolder", str(root), batch_size=2, seed=0, input_size=72, in_chans=1)
    images, _ = next(iter(data.val_loader))
    assert images.shape == (2, 1, 72, 72)  # the large-image preset: resize and centre crop
    assert isinstance(data.train_loader.dataset.dataset, ImageFileDataset)


def test_build_data_image_folder_needs_input_size(make_image_folder):
    root = make_image_folder(classes=("a", "b"))
    with pytest.raises(DataError, match="input-size"):
        build_data("imagefolder", str(root), batch_size=2, seed=0)


def test_build_data_refuses_batch_larger_than_training_set(make_image_folder):
    root = make_image_folder(classes=("a", "b"), per_class={"train": 2, "val": 1})
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_data("imagefolder", str(root), batch_size=8, seed=0, input_size=16)


# --- whole-batch augmentation ---------------------------------------------------------------------


def test_batch_augment_is_a_padded_crop_and_flip_of_each_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    seeds = torch.randint(0, 2**62, (64,))
    augment = BatchAugment(mean=(0.5,), std=(0.25,), padding=2, hflip=0.5)
    out = augment(images, seeds)
    padded = torch.nn.functional.pad(images.float() / 255, (2, 2, 2, 2))
    flips, offsets = 0, set()
    for b in range(64):
        found = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.allclose(
                (padded[b, :, dy : dy + 8, dx : dx + 8].flip(-1) if flip else padded[b, :, dy : dy + 8, dx : dx + 8])
                .sub(0.5)
                .div(0.25),
                out[b],
            )
        ]
        assert found, f"image {b} is not a crop of its padded original"
        flips += found[0][2]
        offsets.add(found[0][:2])
    assert 16 < flips < 48 and len(offsets) > 12  # both flips and many offsets occur


def test_batch_augment_depends_on_each_images_seed_only():
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8)
    seeds = torch.arange(10) * 7919 + 13
    augment = BatchAugment(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), padding=3)
    whole = augment(images, seeds)
    assert torch.equal(augment(images[3:7], seeds[3:7]), whole[3:7])  # another batch around it: same result
    assert not torch.equal(augment(images, seeds + 1), whole)


@needs_fashion_mnist
def test_in_memory_data_uses_whole_batch_augmentation_unless_asked_not_to():
    data = build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=320)
    images, labels, indices, seeds = next(iter(data.train_loader))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 28, 28) and seeds.shape == indices.shape == (32,)
    assert torch.equal(data.train_loader.dataset.labels[indices], labels)
    assert data.batch_transform(images, seeds).shape == (32, 1, 28, 28)
    erasing = build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=320, random_erasing=0.25)
    assert erasing.batch_transform is not None and erasing.batch_transform.random_erasing == 0.25
    paper = build_data(
        "fashion-mnist", None, batch_size=32, seed=0, train_subset=320, rand_augment="rand-m9-mstd0.5-inc1"
    )
    assert paper.batch_transform.rand_augment.policy.increasing  # the paper's recipe, whole-batch too
    assert paper.batch_transform.rand_augment.fill == (73,)  # round(255 x the data set's mean), as timm's hparams
    for per_image in (
        build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=320, rand_augment="rand-m9-mstd0.5",
                   batched=False),
        build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=320, rand_augment="rand-m9-tweights"),
    ):  # fmt: skip
        assert per_image.batch_transform is None and next(iter(per_image.train_loader))[0].dtype == torch.float32


def _erased_boxes(out: torch.Tensor, background: float) -> list[tuple[int, int] | None]:
    """(height, width) of the one rectangle of each image that differs from ``background``, or None."""
    boxes: list[tuple[int, int] | None] = []
    for image in out:
        changed = (image != background).any(dim=0)
        if not changed.any():
            boxes.append(None)
            continue
        rows, cols = changed.any(dim=1).nonzero()[:, 0], changed.any(dim=0).nonzero()[:, 0]
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(changed.sum()) == height * width, "the erased pixels are not one rectangle"
        boxes.append((height, width))
    return boxes


def test_batch_random_erasing_draws_timms_boxes_with_normal_noise():
    count, side = 4000, 28
    # a constant image far from the noise: an erased pixel is one that changed (no crop padding, no flip effect)
    images = torch.full((count, 1, side, side), 255, dtype=torch.uint8)
    augment = BatchAugment(mean=(0.0,), std=(0.01,), padding=0, hflip=0.0, random_erasing=0.25)
    out = augment(images, torch.arange(count) * 104729 + 7)
    background = 100.0  # 255 / 255 normalised with mean 0, std 0.01
    ours = _erased_boxes(out, background)
    erased = [box for box in ours if box is not None]
    assert abs(len(erased) / count - 0.25) < 0.03  # the probability of erasing an image
    noise = out[out != background]
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02  # standard normal fill

    from timm.data.random_erasing import RandomErasing

    torch.manual_seed(0)
    reference = RandomErasing(probability=1.0, mode="pixel", max_count=1, device="cpu")
    drawn = [
        _erased_boxes(reference(torch.full((1, side, side), background))[None], background)[0] for _ in range(2000)
    ]
    timm_boxes = [box for box in drawn if box is not None]
    ours_area = [h * w / side**2 for h, w in erased]
    timm_area = [h * w / side**2 for h, w in timm_boxes]
    ours_aspect = [math.log(h / w) for h, w in erased]
    timm_aspect = [math.log(h / w) for h, w in timm_boxes]
    assert abs(statistics.mean(ours_area) - statistics.mean(timm_area)) < 0.01
    assert abs(statistics.stdev(ours_area) - statistics.stdev(timm_area)) < 0.01
    assert abs(statistics.mean(ours_aspect)) < 0.06 and abs(statistics.mean(timm_aspect)) < 0.06
    assert abs(statistics.stdev(ours_aspect) - statistics.stdev(timm_aspect)) < 0.05


def test_batch_random_erasing_depends_on_each_images_seed_only():
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    seeds = torch.arange(64) * 7919 + 13
    augment = BatchAugment(mean=(0.5,), std=(0.2,), padding=3, random_erasing=0.5)
    whole = augment(images, seeds)
    assert torch.equal(augment(images[10:20], seeds[10:20]), whole[10:20])
    plain = BatchAugment(mean=(0.5,), std=(0.2,), padding=3)(images, seeds)
    differs = (whole != plain).flatten(1).any(dim=1)
    assert 16 < int(differs.sum()) < 48  # erasing only changes some images; their crop and flip are unchanged


def test_a_batch_moves_its_images_and_labels_and_keeps_indices_and_seeds_on_the_host():
    """The indices and seeds decide on the host (cache lookups, augmentation draws): no device round trip."""
    batch = Batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([1, 2]), torch.tensor([5, 6]),
                  torch.tensor([7, 8]))  # fmt: skip
    moved = batch.to(torch.device("meta"))  # a device other than the host's, without a GPU
    assert moved.images.device.type == moved.labels.device.type == "meta"
    assert moved.indices is batch.indices and moved.seeds is batch.seeds
    assert Batch(batch.images, batch.labels, batch.indices).to(torch.device("meta")).seeds is None


# --- decode-once image folders ----------------------------------------------------------------------------------


def test_a_small_image_folder_within_the_budget_is_decoded_once_and_trained_from_memory(
    make_image_folder, tmp_path, monkeypatch
):
    import deit.data.decoded
    from deit.data.batched import InMemoryBatches
    from deit.data.datasets import decode_to_size, scan_image_folder

    root = make_image_folder(per_class={"train": 6, "val": 2})
    cache = tmp_path / "cache"
    data = build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=24, decode_budget_gb=1.0,
                      decode_cache=str(cache))  # fmt: skip
    assert isinstance(data.train_loader.dataset, InMemoryBatches) and data.batch_transform is not None
    _, samples = scan_image_folder(root)
    expected = torch.stack([decode_to_size(path, 3, 24) for path, _ in samples["train"]])
    assert torch.equal(data.train_loader.dataset.images, expected)  # resized and centre-cropped, as the eval path
    assert data.train_loader.dataset.labels.tolist() == [label for _, label in samples["train"]]
    assert len(list(cache.glob("*.npy"))) == 1
    # a second run reads the cache: no file is decoded again
    with monkeypatch.context() as patched:
        patched.setattr(deit.data.decoded, "decode_to_size", lambda *args: pytest.fail("decoded again"))
        again = build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=24, decode_budget_gb=1.0,
                           decode_cache=str(cache))  # fmt: skip
    assert torch.equal(again.train_loader.dataset.images, expected)
    # a changed file makes a new cache file, which replaces the old one
    changed = samples["train"][0][0]
    Image.new("RGB", (30, 30), (200, 10, 10)).save(changed, format=Image.open(changed).format)
    third = build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=24, decode_budget_gb=1.0,
                       decode_cache=str(cache))  # fmt: skip
    assert torch.equal(third.train_loader.dataset.images[0], decode_to_size(changed, 3, 24))
    assert len(list(cache.glob("*.npy"))) == 1


def test_folders_over_the_budget_or_of_large_images_keep_the_per_image_path(make_image_folder):
    root = make_image_folder(per_class={"train": 6, "val": 2})
    for size, budget in ((24, 1e-6), (24, 0.0), (96, 1.0)):
        data = build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=size, decode_budget_gb=budget)
        assert data.batch_transform is None and next(iter(data.train_loader)).images.dtype == torch.float32


def test_decoding_once_follows_bad_files(make_image_folder):
    root = make_image_folder(per_class={"train": 6, "val": 2})
    broken = root / "train" / "bee" / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=24, decode_budget_gb=1.0)
    skipped = build_data("imagefolder", str(root), batch_size=6, seed=0, input_size=24, decode_budget_gb=1.0,
                         bad_files="skip")  # fmt: skip
    assert len(skipped.train_loader.dataset) == 18 and skipped.batch_transform is not None
