"""The self-supervised objectives against hand-computed values; MoCo's queue; the momentum target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deit.ssl.losses import byol_loss, info_nce, nt_xent
from deit.ssl.momentum import KeyQueue, follow, frozen_copy, momentum_at


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
