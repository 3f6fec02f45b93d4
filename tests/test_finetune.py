"""Fine-tuning at a new resolution and class count: position-embedding resampling and --finetune runs."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from conftest import needs_fashion_mnist
from deit.config import TrainConfig, with_overrides
from deit.models import create_model, resample_pos_embed
from deit.models.pos_embed import adapt_input_conv
from deit.training import fit


def test_identity_resample_returns_the_same_tensor():
    pos_embed = torch.randn(1, 2 + 14 * 14, 8)
    assert resample_pos_embed(pos_embed, 14, num_prefix_tokens=2) is pos_embed


def test_resample_keeps_prefix_tokens_bit_identical():
    pos_embed = torch.randn(1, 2 + 4 * 4, 8)
    resampled = resample_pos_embed(pos_embed, 6, num_prefix_tokens=2)
    assert resampled.shape == (1, 2 + 36, 8)
    assert torch.equal(resampled[:, :2], pos_embed[:, :2])


def test_resample_of_a_smooth_grid_stays_smooth():
    """A constant grid stays constant under bicubic resampling: nothing is scrambled or transposed."""
    row = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 4, 3)  # value = row index
    pos_embed = torch.cat([torch.zeros(1, 1, 3), row.reshape(1, 16, 3)], dim=1)
    grid = resample_pos_embed(pos_embed, 8, num_prefix_tokens=1)[:, 1:].reshape(8, 8, 3)
    assert torch.allclose(grid[:, 0], grid[:, 5], atol=1e-5)  # columns agree: rows carry the variation
    assert (grid[1:, 0, 0] >= grid[:-1, 0, 0] - 1e-5).all()


def test_official_weights_load_at_384_with_new_heads(tmp_path, fast_init, caplog):
    official = timm.create_model("deit_tiny_distilled_patch16_224")
    path = tmp_path / "official.pth"
    torch.save({"model": official.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="deit"):
        model = create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=384, pretrained=str(path))
    assert model.pos_embed.shape == (1, 2 + 24 * 24, 192)
    assert torch.equal(model.pos_embed[:, :2], official.pos_embed[:, :2])
    assert torch.equal(model.blocks[3].attn.qkv.weight, official.blocks[3].attn.qkv.weight)
    assert model.head.weight.shape == (10, 192)
    assert "resampled from a 14² to a 24²" in caplog.text and "1000 classes" in caplog.text


def test_distilled_weights_into_a_plain_model_are_refused(tmp_path, fast_init):
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224").state_dict(), path)
    with pytest.raises(ValueError, match="distillation token"):
        create_model("deit_tiny_patch16_224", pretrained=str(path))


def test_input_conv_adapts_to_grayscale_and_more_channels():
    weight = torch.randn(4, 3, 2, 2)
    gray = adapt_input_conv(weight, 1)
    torch.testing.assert_close(gray, weight.sum(dim=1, keepdim=True))
    image = torch.rand(1, 1, 2, 2)
    # a gray image seen in 3 channels gives the same response as through the summed kernel
    torch.testing.assert_close(
        torch.nn.functional.conv2d(image.expand(1, 3, 2, 2), weight), torch.nn.functional.conv2d(image, gray)
    )
    assert adapt_input_conv(weight, 4).shape == (4, 4, 2, 2)


@needs_fashion_mnist
def test_finetune_28_to_42_px_with_and_without_distillation(tmp_path, caplog):
    common = {
        "model.name": "deit_pico_distilled_patch7_28", "data.train_subset": 256, "optim.batch_size": 32,
        "optim.epochs": 1, "optim.warmup_epochs": 0, "run.progress": False, "run.eval_teacher": False,
    }  # fmt: skip
    fit(with_overrides(TrainConfig(), {**common, "run.output_dir": str(tmp_path / "s28")}))
    fit(with_overrides(TrainConfig(), {**common, "model.name": "resnet10t", "run.output_dir": str(tmp_path / "t")}))
    source = str(tmp_path / "s28" / "checkpoint.pth")
    for name, extra in (
        ("plain", {}),
        ("distilled", {"distill.type": "hard", "distill.teacher_path": str(tmp_path / "t" / "checkpoint.pth")}),
    ):
        with caplog.at_level(logging.INFO, logger="deit"):
            result = fit(
                with_overrides(
                    TrainConfig(),
                    {
                        **common,
                        **extra,
                        "model.finetune": source,
                        "data.input_size": 42,
                        "run.output_dir": str(tmp_path / name),
                    },
                )
            )
        assert result.model.pos_embed.shape == (1, 2 + 6 * 6, 64)
        assert 0.0 <= result.final["acc1"] <= 100.0 and result.final["num_samples"] == 10000
        assert "resampled from a 4² to a 6² patch grid" in caplog.text
        state = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
        assert state["data"]["input_size"] == 42 and state["model_spec"]["img_size"] == 42
