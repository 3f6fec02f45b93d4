"""The self-supervised objectives against hand-computed values; MoCo's queue; the momentum target."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import needs_fashion_mnist
from deit.engine import Precision
from deit.ssl.losses import byol_loss, cross_view_info_nce, info_nce, nt_xent
from deit.ssl.momentum import KeyQueue, follow, frozen_copy, momentum_at

FP32 = Precision.resolve("none", torch.device("cpu"))


def test_nt_xent_by_hand():
    # two images, two views each, on the unit circle: view pairs at 0 and 90 degrees apart
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tau = 0.5
    views = [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 0.0)]
    positive_of = [2, 3, 0, 1]
    total = 0.0
    for i, (x, y) in enumerate(views):
        sims = {j: (x * u + y * v) / tau for j, (u, v) in enumerate(views) if j != i}
        total += -sims[positive_of[i]] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / 4, rel=1e-6)
    # the scale of the embeddings does not matter: they are normalised
    assert nt_xent(3 * z1, 0.5 * z2, tau).item() == pytest.approx(total / 4, rel=1e-6)


def test_info_nce_with_a_queue_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.2
    logits = [0.6 / tau, 0.0 / tau, -1.0 / tau]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert info_nce(q, k, queue, tau).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_without_a_queue_uses_the_batch_and_moco_v3_scale():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 1.0
    per_query = -1.0 + math.log(math.e + 1.0)  # own key cos 1, the other 0
    assert info_nce(q, k, None, tau).item() == pytest.approx(2 * tau * per_query, rel=1e-6)


def test_the_keys_get_no_gradient():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    info_nce(q, k, None, 0.2).backward()
    assert q.grad is not None and k.grad is None
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_the_losses_compute_in_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    a, b, queue = (torch.randn(n, 32, generator=generator) for n in (64, 64, 256))
    losses = {
        "nt_xent": lambda: nt_xent(a, b, 0.2),
        "info_nce, queue": lambda: info_nce(a, b, queue, 0.2),
        "info_nce, batch": lambda: info_nce(a, b, None, 0.2),
        "cmc": lambda: cross_view_info_nce(a, b, queue, 0.07),
        "byol": lambda: byol_loss(a, b),
    }
    for name, loss in losses.items():
        exact = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = loss()
        # bf16 similarities would be off by about 1e-3 of the loss; fp32 agrees to rounding
        assert under_autocast.dtype == torch.float32 and torch.allclose(under_autocast, exact, rtol=1e-6), name


def test_byol_loss_by_hand():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0]])  # the same direction, then orthogonal
    assert byol_loss(p, z).item() == pytest.approx((0.0 + 2.0) / 2)


def test_the_queue_replaces_its_oldest_keys_and_wraps_around():
    queue = KeyQueue(size=5, dim=2)
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    queue.push(keys[:3])
    assert torch.equal(queue.keys[:3], keys[:3]) and queue.position.item() == 3
    queue.push(keys[3:7])  # two at the end, two wrapped to the front
    assert torch.equal(queue.keys, torch.stack([keys[5], keys[6], keys[2], keys[3], keys[4]]))
    assert queue.position.item() == 2
    assert set(queue.state_dict()) == {"keys", "position"}  # a checkpoint carries it


def test_moco_v2_normalises_in_groups_the_keys_after_a_shuffle_and_gives_them_back_in_order():
    from deit.ssl.moco import in_groups

    torch.manual_seed(0)
    views = torch.randn(64, 8) * 3 + 5
    norm = nn.BatchNorm1d(8, affine=False).train()
    grouped = in_groups(norm, views, 4)
    for part in grouped.chunk(4):  # each group normalised over itself alone
        assert torch.allclose(part.mean(dim=0), torch.zeros(8), atol=1e-5)
    order = torch.randperm(64)
    shuffled = in_groups(norm, views, 4, order)
    for members in order.chunk(4):  # the groups are the shuffled slices, and each row is back at its own place
        assert torch.allclose(shuffled[members].mean(dim=0), torch.zeros(8), atol=1e-5)
        assert torch.allclose(shuffled[members], norm(views[members]), atol=1e-5)
    linear = nn.Linear(8, 3)
    assert torch.allclose(in_groups(linear, views, 4, order), linear(views), atol=1e-6)  # rows back in order


def test_moco_v2s_head_has_no_batch_norm_and_v3s_has():
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.moco import MoCo

    def norms(version: int) -> int:
        backbone = Backbone(create_model("deit_pico_patch7_28", num_classes=1))
        moco = MoCo(backbone, version=version, total_steps=10)
        return sum(isinstance(m, nn.BatchNorm1d) for m in [*moco.projector.modules(), *moco.predictor.modules()])

    assert norms(2) == 0 and norms(3) > 0


def test_the_momentum_rises_from_its_base_to_one():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_the_target_follows_the_online_network_by_momentum():
    online = nn.BatchNorm1d(3)
    target = frozen_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.fill_(3.0)
        online.running_mean.fill_(7.0)
    follow(target, online, momentum=0.75)
    assert torch.allclose(target.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(target.running_mean, online.running_mean)  # buffers are copied


# --- pretraining runs -------------------------------------------------------------------------------------------


def pretrain_config(out, method: str, **overrides):
    from deit.config import TrainConfig, with_overrides

    values = {
        "model.name": "deit_pico_patch7_28",
        "data.dataset": "fashion-mnist",
        "data.train_subset": 256,
        "optim.epochs": 3,
        "optim.batch_size": 64,
        "optim.lr": 4e-3,
        "optim.warmup_epochs": 0,
        "pretrain.method": method,
        "pretrain.queue_size": 256,
        "run.eval_interval": 3,
        "run.progress": False,
        "run.output_dir": None if out is None else str(out),
    }
    return with_overrides(TrainConfig(), {**values, **overrides})


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["simclr", "moco", "mocov3", "byol"])
def test_each_method_lowers_its_loss_without_collapsing(method, tmp_path):
    from deit.ssl.method import Method
    from deit.ssl.pretrain import embed
    from deit.training import fit

    result = fit(pretrain_config(tmp_path / method, method))
    steps = [json.loads(line) for line in (tmp_path / method / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 12
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    if method == "moco":
        # the queue starts as random keys, easy negatives; once real keys fill it (step 2) the loss jumps, so
        # compare with chance instead: one positive among 256 queued negatives
        assert last < math.log(256 + 1) - 0.2, (method, last)
    else:
        assert last < first, (method, first, last)
    assert 10 < result.final["acc1"] <= 100 and result.final["num_samples"] == 10000  # the kNN monitor ran
    method_module = result.model
    assert isinstance(method_module, Method)
    images = torch.randn(128, 1, 28, 28)
    features = embed(method_module.backbone, images, precision=FP32)
    assert features.std(dim=0).mean() > 0.1 / math.sqrt(features.shape[1])  # not one point for every image


def interrupted_after_step(config, step: int, monkeypatch) -> dict:
    """Run ``config`` until a stop request (a SIGTERM's) right after ``step`` is logged; return its checkpoint."""
    import deit.training
    from deit.checkpoint import load_checkpoint
    from deit.interrupts import StopRequest
    from deit.training import RunInterrupted, fit

    stop, real_step = StopRequest(), deit.training.RunLogs.step

    def stop_after(self, record):
        real_step(self, record)
        if record["step"] == step:
            stop.request(15)

    with monkeypatch.context() as patched:
        patched.setattr(deit.training.RunLogs, "step", stop_after)
        with pytest.raises(RunInterrupted):
            fit(config, stop=stop)
    return load_checkpoint(f"{config.run.output_dir}/checkpoint.pth")


def assert_same_state(first: nn.Module, second: nn.Module) -> None:
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


@needs_fashion_mnist
def test_moco_resumes_mid_epoch_exactly_queue_and_key_encoder_included(tmp_path, monkeypatch):
    from deit.training import fit

    whole = fit(pretrain_config(tmp_path / "whole", "moco", **{"optim.epochs": 2}))
    saved = interrupted_after_step(pretrain_config(tmp_path / "cut", "moco", **{"optim.epochs": 2}), 5, monkeypatch)
    # the request comes after step 5 is logged; every process agrees on it within step 6, which completes
    # (4 steps an epoch: the checkpoint is inside the second epoch)
    assert saved["epoch"] == 1 and saved["epoch_step"] == 3 and "queue.keys" in saved["model"]
    resumed = fit(pretrain_config(tmp_path / "cut", "moco", **{"optim.epochs": 2, "run.resume": "auto"}))
    assert_same_state(whole.model, resumed.model)


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["simclr", "mocov3", "byol", "cmc", "cpc"])
def test_every_method_resumes_mid_epoch_exactly(method, tmp_path, monkeypatch):
    """MoCo's, BEiT's and DeepCluster's own tests check their extra state; here the rest: EMA targets, CMC's queue."""
    from deit.training import fit

    model = {"model.name": "resnet8_small", "model.drop_path": 0.0} if method == "cpc" else {}
    whole = fit(pretrain_config(tmp_path / "whole", method, **{"optim.epochs": 2, **model}))
    cut = pretrain_config(tmp_path / "cut", method, **{"optim.epochs": 2, **model})
    saved = interrupted_after_step(cut, 5, monkeypatch)
    assert saved["epoch"] == 1 and saved["epoch_step"] == 3  # inside the second epoch
    resumed = fit(pretrain_config(tmp_path / "cut", method, **{"optim.epochs": 2, "run.resume": "auto", **model}))
    assert_same_state(whole.model, resumed.model)


def test_views_are_two_different_crops_of_each_image_drawn_from_its_seed():
    from deit.ssl.views import TwoViews

    images = (torch.rand(8, 1, 28, 28) * 255).to(torch.uint8)
    views = TwoViews(mean=(0.5,), std=(0.25,))
    out = views(images, torch.arange(8))
    assert out.shape == (16, 1, 28, 28)
    assert not torch.equal(out[:8], out[8:])  # two different views of each image
    shuffled = views(images.flip(0), torch.arange(8).flip(0))
    torch.testing.assert_close(shuffled[:8], out[:8].flip(0))  # each image's views depend on its seed only
