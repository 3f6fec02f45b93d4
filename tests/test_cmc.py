"""CMC: the two views of an image, the cross-view loss by hand, and a run whose representation is both encoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fashion_mnist
from deit.models import create_model
from deit.ssl.backbone import Backbone
from deit.ssl.cmc import CMC, ViewSplit, rgb_to_lab
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


def small_cmc(channels: int = 1, queue_size: int = 16) -> CMC:
    torch.manual_seed(0)
    mean, std = (0.5,) * channels, (0.5,) * channels

    def encoder(in_chans: int) -> Backbone:
        return Backbone(create_model("resnet8_small", num_classes=10, in_chans=in_chans, img_size=28))

    return CMC(encoder(channels), encoder(2), mean=mean, std=std, dim=8, queue_size=queue_size, temperature=0.1)


def cmc_step(cmc: CMC, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of one call of ``cmc.losses`` and the embeddings z1, z2 it computed (read off the heads)."""
    seen = {}
    hooks = [
        cmc.first_head.register_forward_hook(lambda module, inputs, output: seen.__setitem__("z1", output)),
        cmc.second_head.register_forward_hook(lambda module, inputs, output: seen.__setitem__("z2", output)),
    ]
    loss = cmc.losses(images)["loss"]
    for hook in hooks:
        hook.remove()
    return loss, seen["z1"].detach(), seen["z2"].detach()


def distinguishable_queues(cmc: CMC) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size, dim = cmc.first_queue.keys.shape
    first, second = (F.normalize(torch.randn(size, dim, generator=generator), dim=1) for _ in range(2))
    cmc.first_queue.keys.copy_(first)
    cmc.second_queue.keys.copy_(second)
    return first, second


def test_each_direction_of_cmc_contrasts_against_the_other_views_queue():
    cmc = small_cmc(queue_size=8).train()
    distinguishable_queues(cmc)
    images = torch.randn(8, 1, 28, 28)  # grayscale: two crops of 4 images, stacked
    cmc_step(cmc, images)  # a first step on the same images: each queue now holds its view's embeddings of them
    first_queue, second_queue = cmc.first_queue.keys.clone(), cmc.second_queue.keys.clone()
    loss, z1, z2 = cmc_step(cmc, images)

    def by_hand(negatives_of_z1, negatives_of_z2):
        return (
            cross_view_info_nce(z1, z2, negatives_of_z1, cmc.temperature)
            + cross_view_info_nce(z2, z1, negatives_of_z2, cmc.temperature)
        ) / 2

    # z1 against z2 and the second view's queue, z2 against z1 and the first view's; the queues as they were
    # before the call: the batch's own embeddings are pushed only after the loss
    assert torch.allclose(loss, by_hand(second_queue, first_queue), rtol=1e-5, atol=1e-6)
    for wrong in [(first_queue, second_queue), (first_queue, first_queue), (second_queue, second_queue)]:
        assert (by_hand(*wrong) - loss).abs() > 1.0  # the queues are told apart


def test_cmc_pushes_each_views_normalised_embeddings_into_its_own_queue_in_training_only():
    cmc = small_cmc()
    first_queue, second_queue = distinguishable_queues(cmc)
    images = torch.randn(8, 1, 28, 28)  # two crops of 4 images
    cmc.eval()
    cmc_step(cmc, images)
    assert torch.equal(cmc.first_queue.keys, first_queue) and torch.equal(cmc.second_queue.keys, second_queue)
    assert cmc.first_queue.position == 0 and cmc.second_queue.position == 0

    cmc.train()
    _, z1, z2 = cmc_step(cmc, images)
    assert cmc.first_queue.position == 4 and cmc.second_queue.position == 4
    assert torch.allclose(cmc.first_queue.keys[:4], F.normalize(z1, dim=1), atol=1e-6)
    assert torch.allclose(cmc.second_queue.keys[:4], F.normalize(z2, dim=1), atol=1e-6)
    assert not torch.allclose(F.normalize(z1, dim=1), F.normalize(z2, dim=1), atol=1e-2)  # the views differ
    assert torch.equal(cmc.first_queue.keys[4:], first_queue[4:])  # the older keys stay
    assert torch.equal(cmc.second_queue.keys[4:], second_queue[4:])


def test_gray_cmc_takes_the_intensity_of_one_crop_and_the_gradients_of_the_other():
    cmc = small_cmc(channels=1)
    assert cmc.step_input == "two views"  # the run stacks two crops of each image, as SimCLR's
    first_crops, second_crops = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    first_view, second_view = cmc.views(torch.cat([first_crops, second_crops]))
    assert torch.equal(first_view, first_crops)
    assert torch.equal(second_view, cmc.split(second_crops)[1])  # not the gradients of the first crop
    assert not torch.allclose(second_view, cmc.split(first_crops)[1])


def test_colour_cmc_splits_one_crop_into_lightness_and_colour_as_the_paper():
    cmc = small_cmc(channels=3)
    assert cmc.step_input == "one view"
    images = torch.randn(3, 3, 28, 28)
    for mine, expected in zip(cmc.views(images), cmc.split(images), strict=True):
        assert torch.equal(mine, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_cmcs_representation_is_the_two_encoders_features_of_their_views_concatenated(channels):
    cmc = small_cmc(channels).eval()
    images = torch.randn(3, channels, 28, 28)
    first_view, second_view = ViewSplit((0.5,) * channels, (0.5,) * channels)(images)
    assert first_view.shape[1] == channels and second_view.shape[1] == 2
    representation = cmc.representation
    with torch.no_grad():
        features = representation(images)
        expected = torch.cat([cmc.backbone(first_view), cmc.second(second_view)], dim=1)
    assert representation.dim == cmc.backbone.dim + cmc.second.dim == features.shape[1] == 256
    assert torch.allclose(features, expected, atol=1e-6)
    assert not torch.allclose(features[:, :128], features[:, 128:], atol=1e-3)  # the order shows


@needs_fashion_mnist
def test_a_cmc_run_learns_and_its_representation_is_both_encoders(tmp_path, capsys):
    from deit.cli.main import main
    from deit.config import with_overrides
    from deit.data.datasets import load_fashion_mnist
    from deit.run import build_run
    from deit.ssl.views import TwoViews
    from deit.training import fit
    from test_ssl import pretrain_config

    config = pretrain_config(tmp_path / "cmc", "cmc", **{"pretrain.queue_size": 256, "optim.epochs": 4})
    untrained_run = build_run(with_overrides(config, {"run.output_dir": None}))
    assert type(untrained_run.data.batch_transform) is TwoViews  # grayscale: two crops (OneView subclasses it)
    untrained = untrained_run.model.eval()
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
