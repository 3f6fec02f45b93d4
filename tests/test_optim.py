"""AdamW parameter groups, learning-rate scaling and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deit.config import OptimConfig
from deit.models import create_model
from deit.optim import REFERENCE_BATCH, WarmupCosine, build_optimizer, param_groups, peak_lr


def group_names(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    """Parameter names of the decay and no-decay groups, matched by identity."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in groups[1]["params"]}
    return decay, no_decay


def test_param_groups_of_a_distilled_vit():
    model = create_model("deit_pico_distilled_patch7_28", num_classes=10)
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = group_names(model, groups)

    assert not decay & no_decay
    assert decay | no_decay == {name for name, _ in model.named_parameters()}  # every parameter, once
    for name in ("pos_embed", "cls_token", "dist_token", "norm.weight", "norm.bias", "head.bias", "head_dist.bias"):
        assert name in no_decay, name
    for name in ("patch_embed.proj.weight", "head.weight", "head_dist.weight"):
        assert name in decay, name
    for i in range(len(model.blocks)):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{i}.{layer}.weight" in decay
            assert f"blocks.{i}.{layer}.bias" in no_decay
        for norm in ("norm1", "norm2"):
            assert f"blocks.{i}.{norm}.weight" in no_decay
            assert f"blocks.{i}.{norm}.bias" in no_decay
    # the rule itself: matrices and kernels decay, vectors and the named tokens do not
    params = dict(model.named_parameters())
    assert all(params[name].ndim >= 2 for name in decay)
    assert all(params[name].ndim <= 1 or name in model.no_weight_decay() for name in no_decay)


def test_param_groups_of_a_cnn_and_frozen_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    assert decay == {"0.weight"}
    assert no_decay == {"0.bias", "1.weight", "1.bias", "3.bias"}  # the frozen 3.weight is in neither


def test_pretraining_keeps_the_vits_tokens_and_beits_mask_embedding_undecayed():
    from deit.ssl.backbone import Backbone
    from deit.ssl.beit import BEiT
    from deit.ssl.byol import BYOL

    vit = create_model("deit_pico_patch7_28", num_classes=10)
    beit = BEiT(Backbone(vit), None)
    decay, no_decay = group_names(beit, param_groups(beit, 0.05))
    assert {"backbone.model.pos_embed", "backbone.model.cls_token", "mask_embedding"} <= no_decay
    assert {"backbone.model.patch_embed.proj.weight", "token_head.weight"} <= decay
    byol = BYOL(Backbone(create_model("deit_pico_patch7_28", num_classes=10)), total_steps=10)
    _, no_decay = group_names(byol, param_groups(byol, 0.05))
    assert "backbone.model.pos_embed" in no_decay  # the frozen target's copy is in neither group


def test_deepclusters_head_stays_at_the_peak_lr_while_the_schedule_decays_the_rest():
    from deit.optim import set_lr
    from deit.ssl.backbone import Backbone
    from deit.ssl.deepcluster import ClusterSettings, DeepCluster

    method = DeepCluster(Backbone(create_model("resnet8_small", num_classes=1, in_chans=1, img_size=28)),
                         num_images=100, settings=ClusterSettings(clusters=20))  # fmt: skip
    optimizer = build_optimizer(method, OptimConfig(lr=4e-3, weight_decay=0.05), global_batch=512)
    head = {id(p) for p in method.classifier.parameters()}
    set_lr(optimizer, 1e-5)  # the end of the cosine
    for group in optimizer.param_groups:
        is_head = {id(p) for p in group["params"]} == head
        assert group["lr"] == (4e-3 if is_head else 1e-5)
    assert sum({id(p) for p in group["params"]} == head for group in optimizer.param_groups) == 1


@pytest.mark.parametrize(("batch", "expected"), [(512, 5e-4), (128, 1.25e-4), (1024, 1e-3)])
def test_peak_lr_scales_with_batch(batch, expected):
    config = OptimConfig(lr=5e-4)
    assert REFERENCE_BATCH == 512
    assert peak_lr(config, batch) == pytest.approx(expected)
    assert peak_lr(OptimConfig(lr=5e-4, scale_lr=False), batch) == 5e-4


def test_build_optimizer_uses_the_groups_and_scaled_lr():
    model = create_model("deit_pico_patch7_28", num_classes=3)
    config = OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    optimizer = build_optimizer(model, config, global_batch=256)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == pytest.approx(5e-4) for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["eps"] == 1e-6


def make_schedule() -> WarmupCosine:
    # 10 epochs of 20 steps, 2 epochs of warm-up, peak 1e-3 at batch 512
    config = OptimConfig(epochs=10, lr=1e-3, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    return WarmupCosine.from_config(config, global_batch=512, steps_per_epoch=20)


def test_schedule_steps():
    schedule = make_schedule()
    assert (schedule.total_steps, schedule.warmup_steps) == (200, 40)
    assert schedule.peak_lr == pytest.approx(1e-3)


def test_schedule_warm_up():
    schedule = make_schedule()
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(20) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # linear: half-way at half the warm-up
    assert schedule(40) == pytest.approx(1e-3)  # end of warm-up: the peak
    warm = [schedule(step) for step in range(41)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))


def test_schedule_cosine_decay():
    schedule = make_schedule()
    assert schedule(120) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way through the decay
    assert schedule(199) == pytest.approx(1e-5, abs=1e-6)  # last step: about min_lr
    assert schedule(199) > 1e-5
    assert schedule(200) == pytest.approx(1e-5)
    assert schedule(10_000) == pytest.approx(1e-5)  # never below the floor
    decay = [schedule(step) for step in range(40, 200)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    step = 77
    progress = (step - 40) / 160
    assert schedule(step) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_without_warm_up_starts_at_peak():
    config = OptimConfig(epochs=2, lr=1e-3, warmup_epochs=0, min_lr=0.0)
    schedule = WarmupCosine.from_config(config, global_batch=512, steps_per_epoch=5)
    assert schedule(0) == pytest.approx(1e-3)
    assert schedule(10) == pytest.approx(0.0, abs=1e-12)
