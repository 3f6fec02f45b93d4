"""CMC: the two views of an image, the cross-view loss by hand, and a run whose representation is both encoders."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_fashion_mnist
from deit.ssl.cmc import ViewSplit, rgb_to_lab
from deit.ssl.losses import cross_view_info_nce


def test_lab_of_known_colours():
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    lab = rgb_to_lab(colours).view(3, 3)
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)  # white
    assert lab[1].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.1)  # sRGB red
    assert lab[2].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)


def test_a_gray_image_splits_into_its_intensity_and_its_gradients():
    split = ViewSplit((0.5,), (0.5,))
    image = torch.zeros(1, 1, 6, 6)
    image[..., 3:] = 1.0  # a vertical edge
    intensity, gradients = split(image)
    assert torch.equal(intensity, image)
    assert gradients.shape == (1, 2, 6, 6)
    assert gradients[0, 0, :, 2:4].min() > 0 and gradients[0, 1].abs().max() == 0  # x-gradient only


def test_a_colour_image_splits_into_lightness_for_the_students_channels_and_ab():
    split = ViewSplit((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    lightness, colour = split(torch.zeros(2, 3, 4, 4))  # normalised 0: mid grey
    assert lightness.shape == (2, 3, 4, 4) and torch.equal(lightness[:, 0], lightness[:, 2])
    assert colour.shape == (2, 2, 4, 4) and colour.abs().max() < 1e-3  # grey has no colour


def test_cross_view_info_nce_by_hand():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    others = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]])
    # anchor 0: positive cos 1, candidates (1, 1, 0); anchor 1: positive cos 0, candidates (0, 0, 1); T = 1
    expected = (-math.log(math.e / (2 * math.e + 1)) - math.log(1 / (2 + math.e))) / 2
    assert cross_view_info_nce(anchors, others, queue, 1.0).item() == pytest.approx(expected, rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    anchors, others = (torch.randn(4, 8, generator=generator, requires_grad=True) for _ in range(2))
    cross_view_info_nce(anchors, others, None, 0.1).backward()
    assert anchors.grad.abs().sum() > 0 and others.grad.abs().sum() > 0  # both encoders learn


@needs_fashion_mnist
def test_a_cmc_run_learns_and_its_representation_is_both_encoders(tmp_path, capsys):
    from deit.cli.main import main
    from deit.config import with_overrides
    from deit.data.datasets import load_fashion_mnist
    from deit.run import build_run
    from deit.training import fit
    from test_ssl import pretrain_config

    config = pretrain_config(tmp_path / "cmc", "cmc", **{"pretrain.queue_size": 256, "optim.epochs": 4})
    untrained = build_run(with_overrides(config, {"run.output_dir": None})).model.eval()
    result = fit(config)
    assert result.final["num_samples"] == 10000  # the kNN monitor scored the concatenated features

    # the queue starts as random (easy) negatives, so the logged loss rises as real ones replace them: judge the
    # two views' agreement on the same held-out images, against the other images of the batch only
    _, test = load_fashion_mnist(None, False)
    images = (test.images[:128].float() / 255 - 0.2860) / 0.3530

    def in_batch_loss(method):
        with torch.no_grad():
            first, second = method.split(images)
            z1 = method.first_head(method.backbone(first))
            z2 = method.second_head(method.second(second))
            return cross_view_info_nce(z1, z2, None, method.temperature).item()

    assert in_batch_loss(result.model.eval()) < in_batch_loss(untrained) - 0.1
    checkpoint = str(tmp_path / "cmc" / "checkpoint.pth")
    assert main(["linear-probe", "--checkpoint", checkpoint, "--label-fraction", "0.01", "--no-baselines"]) == 0
    assert " 128 " in capsys.readouterr().out  # 64 features of each encoder, concatenated
    code = main(["train", "--model", "deit_pico_distilled_patch7_28", "--init", checkpoint, "--train-subset", "256",
                 "--epochs", "1", "--batch-size", "64", "--no-progress"])  # fmt: skip
    assert code == 0  # the first encoder (intensity) starts the student
