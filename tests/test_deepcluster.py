"""DeepCluster: NMI, PCA whitening, a run whose clusters are logged, and an exact resume in the middle of an epoch."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import needs_fashion_mnist
from deit.ssl.deepcluster import nmi, pca_whiten


def test_nmi_is_one_for_the_same_partition_under_other_names_and_near_zero_for_independent_ones():
    a = torch.arange(1000) % 10
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi(a, (a * 7 + 3) % 10) == pytest.approx(1.0)  # cluster names do not matter
    independent = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    assert nmi(a, independent) < 0.05
    assert nmi(a, a // 2) == pytest.approx(math.log(5) / math.sqrt(math.log(10) * math.log(5)), abs=1e-6)


def test_pca_whitening_leaves_uncorrelated_unit_variance_axes():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2000, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    white = pca_whiten(features, 4)
    assert white.shape == (2000, 4)
    assert torch.allclose(torch.cov(white.T), torch.eye(4), atol=1e-3)


def test_each_cluster_gets_the_same_share_of_the_draws_and_an_empty_one_none():
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.deepcluster import ClusterSettings, DeepCluster

    backbone = Backbone(create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28))
    method = DeepCluster(backbone, num_images=100, settings=ClusterSettings(clusters=4))
    assigned = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)  # cluster 3 is empty
    method.assignments.copy_(assigned)
    method.cluster_sizes.copy_(torch.bincount(assigned, minlength=4).float())
    weights = method.sample_weights()
    shares = torch.zeros(4, dtype=weights.dtype).index_add_(0, assigned, weights) / weights.sum()
    assert torch.allclose(shares, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0], dtype=weights.dtype))


def test_before_an_epoch_the_clusters_come_from_unit_length_whitened_features_and_the_head_starts_afresh(
    monkeypatch,
):
    import deit.ssl.deepcluster as deepcluster
    from deit.engine import Precision
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.method import EpochContext

    torch.manual_seed(0)
    backbone = Backbone(create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28))
    method = deepcluster.DeepCluster(
        backbone, num_images=200, settings=deepcluster.ClusterSettings(clusters=8, pca_dim=16)
    )
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    method.losses(torch.randn(4, 1, 28, 28), torch.arange(4))["loss"].backward()
    optimizer.step()  # the head now has Adam moments, and weights moved off their start
    head_before = method.classifier.weight.detach().clone()
    clustered, real_kmeans = [], deepcluster.kmeans

    def recording(points, k, **options):
        clustered.append(points.clone())
        return real_kmeans(points, k, **options)

    monkeypatch.setattr(deepcluster, "kmeans", recording)
    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    cpu = torch.device("cpu")
    context = EpochContext(
        images, torch.arange(200) % 10, (0.5,), (0.5,), cpu, Precision.resolve("none", cpu), optimizer
    )
    notes = method.before_epoch(0, context)
    (points,) = clustered
    assert points.shape == (200, 16) and torch.allclose(points.norm(dim=1), torch.ones(200), atol=1e-5)
    assert notes["clusters"]["empty"] == 0 and int(method.cluster_sizes.sum()) == 200
    assert not torch.equal(method.classifier.weight, head_before) and (method.classifier.bias == 0).all()
    assert method.classifier.weight.std() < 0.03  # trunc_normal(0.02) again
    assert all(parameter not in optimizer.state for parameter in method.classifier.parameters())
    assert any(parameter in optimizer.state for parameter in method.backbone.parameters())  # the backbone keeps its
    method.before_epoch(0, context)  # the same epoch again (a resume): nothing is clustered anew
    assert len(clustered) == 1


def config(out, **overrides):
    from test_ssl import pretrain_config

    values = {"data.train_subset": 512, "pretrain.clusters": 20, "pretrain.pca_dim": 16, "optim.epochs": 2,
              "run.eval_interval": 2, **overrides}  # fmt: skip
    return pretrain_config(out, "deepcluster", **values)


@needs_fashion_mnist
def test_deepcluster_logs_its_clusters_and_resumes_mid_epoch_with_the_same_ones(tmp_path, monkeypatch, caplog):
    from deit.ssl.deepcluster import DeepCluster
    from deit.training import fit
    from test_ssl import assert_same_state, interrupted_after_step

    drawn, real_losses = [], DeepCluster.losses  # the clusters of the images each step trains on

    def recording(self, views, indices):
        drawn.append((int(self.clustered_for), self.assignments[indices].clone(), self.cluster_sizes.clone()))
        return real_losses(self, views, indices)

    with caplog.at_level(logging.INFO, logger="deit"), monkeypatch.context() as patched:
        patched.setattr(DeepCluster, "losses", recording)
        whole = fit(config(tmp_path / "whole"))
    assert "epoch 1: 20 clusters" in caplog.text and "previous epoch's clusters n/a" in caplog.text  # not "-1.000"
    history = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    first, second = history[0]["clusters"], history[1]["clusters"]
    assert 0.1 < first["nmi_labels"] <= 1 and first["nmi_previous"] is None  # even random features group classes
    # against the previous epoch's clusters, not against themselves (1): training moved the features between them
    assert 0 < second["nmi_previous"] < 0.99 and first["largest"] < 512 and first["empty"] == 0
    steps = [json.loads(line) for line in (tmp_path / "whole" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 16 and steps[7]["loss"] < steps[0]["loss"]  # the head learns the epoch's clusters
    first_epoch = [(targets, sizes) for epoch, targets, sizes in drawn if epoch == 0]
    sizes = first_epoch[0][1]
    counts = torch.bincount(torch.cat([targets for targets, _ in first_epoch]), minlength=len(sizes)).float()
    share, spread = 512 / int((sizes > 0).sum()), 4 * (512 / int((sizes > 0).sum())) ** 0.5
    assert sizes.max() > share + spread  # drawing each image once would fail the next line...
    assert ((counts - share).abs()[sizes > 0] < spread).all()  # ...drawing uniformly over the clusters passes it

    saved = interrupted_after_step(config(tmp_path / "cut"), 10, monkeypatch)  # 8 steps an epoch: in the second
    assert saved["epoch"] == 1 and saved["epoch_step"] > 0 and int(saved["model"]["clustered_for"]) == 1
    resumed = fit(config(tmp_path / "cut", **{"run.resume": "auto"}))
    assert_same_state(whole.model, resumed.model)


@needs_fashion_mnist
def test_deepcluster_with_more_clusters_than_images_names_the_setting_before_training(tmp_path):
    from deit.ssl.kmeans import ClusteringError
    from deit.training import fit

    with pytest.raises(ClusteringError, match=r"pretrain.clusters = 100 clusters of 64 training images"):
        fit(config(tmp_path / "run", **{"data.train_subset": 64, "pretrain.clusters": 100, "optim.batch_size": 16}))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
