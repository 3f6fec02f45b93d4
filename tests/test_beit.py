"""BEiT: the visual tokenizer, blockwise masking, the masked-token loss, and a run that resumes exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fashion_mnist
from deit.ssl.kmeans import kmeans, nearest
from deit.ssl.masking import BlockMasks
from deit.ssl.tokenizer import PatchTokenizer, TokenizerError, TokenizerInfo, patchify, train_tokenizer


def test_block_masks_cover_the_target_share_in_blocks_drawn_from_each_seed():
    masking = BlockMasks(grid=7, ratio=0.4, min_block=4)
    masks = masking(torch.arange(2000))
    counts = masks.sum(dim=1).float()
    assert masking.target == 20 and counts.max() <= 20  # a block never overshoots the target
    assert counts.mean() > 19.5  # and the target is nearly always reached
    assert torch.equal(masking(torch.tensor([7, 7])), masking(torch.tensor([7, 7])))  # the seed decides
    assert not torch.equal(masks[0], masks[1])
    # blocks, not scattered patches: most masked patches have a masked neighbour in their row or column
    grid = masks.view(-1, 7, 7)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:] |= grid[:, :-1]
    neighbour[:, :-1] |= grid[:, 1:]
    neighbour[:, :, 1:] |= grid[:, :, :-1]
    neighbour[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & neighbour).sum() / grid.sum() > 0.9
    # every patch position gets masked sometimes: no corner is out of reach
    assert masks.float().mean(dim=0).min() > 0.1


def test_each_block_is_one_rectangle_of_at_least_min_block_patches_tall_or_wide_in_equal_measure():
    masking = BlockMasks(grid=14, ratio=0.4, min_block=16)  # BEiT's: 196 patches, 78 of them masked
    shapes = []
    for seed in range(400):  # the first block of each mask, on an empty grid
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = masking._block(mask, masking.target, torch.Generator().manual_seed(seed))
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert added == mask.sum() == height * width  # one filled rectangle
        assert 16 * 0.6 <= added <= masking.target  # min_block, give or take the rounding of its sides
        assert 0.2 <= height / width <= 5  # aspect ratio in [0.3, 3.3], give or take the rounding
        shapes.append(height / width)
    shapes = torch.tensor(shapes)
    tall, wide = int((shapes > 1.2).sum()), int((shapes < 1 / 1.2).sum())
    assert tall > 100 and wide > 100 and abs(tall - wide) < 60  # log-uniform aspect: as many tall as wide
    assert shapes.max() > 2.5 and shapes.min() < 0.4  # the whole range is drawn


def test_block_masks_on_a_4x4_grid():
    masks = BlockMasks(grid=4)(torch.arange(500))
    assert torch.all(masks.sum(dim=1) == 6)


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(200, 2, generator=generator) for c in centres])
    found, assigned, inertia = kmeans(points, 3, seed=1)
    assert torch.cdist(found, centres).min(dim=1).values.max() < 0.1 and inertia < 0.05
    assert torch.equal(assigned, nearest(points, found))


def test_an_empty_cluster_is_split_off_a_full_one():
    """DeepCluster's fix, on a crafted start: one centroid is far from every point, so its cluster is empty."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    points = torch.cat([c + torch.randn(300, 2, generator=generator) for c in centres])
    start = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1000.0, 1000.0]])
    _, assigned, _ = kmeans(points, 3, init=start, iterations=1)  # one round: the empty cluster is split at once
    sizes = torch.bincount(assigned, minlength=3)
    assert (sizes > 0).all(), sizes  # the far centroid took half of a blob
    _, assigned, inertia_split = kmeans(points, 3, init=start, iterations=20)
    assert (torch.bincount(assigned, minlength=3) > 50).all()


def test_the_tokenizer_names_each_patch_by_its_nearest_centroid_and_round_trips(tmp_path):
    images = torch.zeros(2, 1, 8, 8)
    images[0, :, :4, :4] = 1.0  # image 0: its top-left patch is bright
    codebook = torch.stack([torch.zeros(16), torch.ones(16)])
    tokenizer = PatchTokenizer(codebook, TokenizerInfo(4, 1, "test", 8, 10, 0.0))
    assert tokenizer(images).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]
    tokenizer.save(tmp_path / "tokens.safetensors")
    again = PatchTokenizer.load(tmp_path / "tokens.safetensors")
    assert torch.equal(again.codebook, tokenizer.codebook) and again.info == tokenizer.info
    with pytest.raises(TokenizerError, match="patches of 4 px, the ViT has 1-channel patches of 7 px"):
        again.check(7, 1)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(TokenizerError, match="not a tokenizer"):
        PatchTokenizer.load(tmp_path / "bad.safetensors")


def test_patchify_follows_the_vits_patch_order():
    images = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # second patch of the first row


def small_beit(tokens: int = 16):
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.beit import BEiT

    torch.manual_seed(0)
    vit = create_model("deit_pico_patch4_28", num_classes=10, in_chans=1, img_size=28)
    tokenizer = train_tokenizer(torch.randn(32, 1, 28, 28), patch_size=4, codebook_size=tokens, dataset="test")
    return BEiT(Backbone(vit), tokenizer)


def test_unmasked_positions_carry_no_loss():
    beit = small_beit()
    images = torch.randn(4, 1, 28, 28)
    masks = BlockMasks(grid=7)(torch.arange(4))
    base = beit.losses(images, masks)["loss"]
    real = beit.tokenizer.forward

    def other_tokens_where_visible(x):
        tokens = real(x)
        return torch.where(masks, tokens, (tokens + 1) % beit.tokenizer.size)

    beit.tokenizer.forward = other_tokens_where_visible
    assert torch.equal(beit.losses(images, masks)["loss"], base)  # the targets of visible patches do not count
    beit.tokenizer.forward = lambda x: torch.where(masks, (real(x) + 1) % beit.tokenizer.size, real(x))
    assert not torch.equal(beit.losses(images, masks)["loss"], base)  # those of masked patches do


def test_a_masked_patch_sees_the_mask_embedding_not_its_pixels():
    beit = small_beit().eval()
    images = torch.randn(1, 1, 28, 28)
    masks = torch.zeros(1, 49, dtype=torch.bool)
    masks[0, 0] = True
    changed = images.clone()
    changed[..., :4, :4] += 5  # the pixels of the masked patch only
    assert torch.allclose(beit.patch_features(images, masks), beit.patch_features(changed, masks))
    assert not torch.allclose(beit.patch_features(images, ~masks), beit.patch_features(changed, ~masks))


def test_beit_refuses_a_cnn_and_a_tokenizer_of_other_patches():
    from deit.errors import ModelError
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.beit import BEiT

    tokenizer = train_tokenizer(torch.randn(8, 1, 28, 28), patch_size=7, codebook_size=8, dataset="test")
    with pytest.raises(ModelError, match="not SmallResNet"):
        BEiT(Backbone(create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28)), tokenizer)
    with pytest.raises(TokenizerError, match="patches of 7 px, the ViT has 1-channel patches of 4 px"):
        BEiT(Backbone(create_model("deit_pico_patch4_28", num_classes=10, in_chans=1, img_size=28)), tokenizer)


@needs_fashion_mnist
def test_beit_pretrains_resumes_exactly_and_starts_a_student(tmp_path, monkeypatch, capsys, caplog):
    from deit.cli.main import main
    from deit.data.datasets import load_fashion_mnist
    from deit.training import fit
    from test_ssl import assert_same_state, interrupted_after_step, pretrain_config

    tokens = tmp_path / "tokens.safetensors"
    assert main(["tokenizer", "--patch-size", "4", "--codebook-size", "32", "--samples", "20000",
                 "--output", str(tokens)]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["patch_size"] == 4
    beit = {"model.name": "deit_pico_patch4_28", "pretrain.tokenizer": str(tokens), "optim.epochs": 2}
    with caplog.at_level(logging.INFO, logger="deit"):
        whole = fit(pretrain_config(tmp_path / "whole", "beit", **beit))
    # the run's log says which tokenizer it used: the file, what it is, and its tensors' fingerprint
    assert "BEiT's targets: the kmeans tokenizer of 32 tokens for 1-channel 4 px patches" in caplog.text
    assert f"fingerprint {printed['fingerprint']}" in caplog.text
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "steps.jsonl").read_text().splitlines()]
    assert len(losses) == 8  # 4 steps an epoch
    # it learns to predict the masked tokens: the last steps' mean loss against the first steps', not one pair
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert whole.final["num_samples"] == 10000  # the kNN monitor scored the patch tokens' mean
    assert whole.model.backbone.pool == "mean"
    # and its representation has not collapsed: different images keep different features
    _, test = load_fashion_mnist(None, False)
    with torch.no_grad():
        features = whole.model.representation.eval()((test.images[:64].float() / 255 - 0.2860) / 0.3530)
    directions = F.normalize(features, dim=1)
    cosines = (directions @ directions.T)[~torch.eye(64, dtype=torch.bool)]  # every pair of different images
    assert cosines.mean() < 0.9 and features.std(dim=0).mean() > 0.05

    saved = interrupted_after_step(pretrain_config(tmp_path / "cut", "beit", **beit), 5, monkeypatch)
    assert saved["epoch_step"] > 0 and "tokenizer.codebook" in saved["model"]  # the tokenizer is in the checkpoint
    # another tokenizer in the file now: the resumed run keeps the checkpoint's, and its log says so
    assert main(["tokenizer", "--patch-size", "4", "--codebook-size", "32", "--samples", "20000", "--seed", "1",
                 "--output", str(tokens)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["fingerprint"] != printed["fingerprint"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit"):
        resumed = fit(pretrain_config(tmp_path / "cut", "beit", **{**beit, "run.resume": "auto"}))
    assert f"fingerprint {printed['fingerprint']}" in caplog.text
    assert_same_state(whole.model, resumed.model)

    student = tmp_path / "student"
    pretrained = str(tmp_path / "whole" / "checkpoint.pth")
    code = main(["train", "--model", "deit_pico_distilled_patch4_28", "--init", pretrained,
                 "--train-subset", "256", "--epochs", "1", "--batch-size", "64", "--no-progress",
                 "--output-dir", str(student)])  # fmt: skip
    assert code == 0
    from deit.ssl.transfer import load_backbone

    assert load_backbone(pretrained)[0].pool == "mean"  # the probe reads what the run's kNN monitor read


def test_beits_features_are_the_patch_tokens_mean_and_every_other_methods_the_class_token():
    from deit.models import create_model
    from deit.ssl.backbone import Backbone, pooling_for

    vit = create_model("deit_pico_patch7_28", num_classes=10, in_chans=1).eval()
    images = torch.randn(2, 1, 28, 28)
    tokens = vit.forward_features(images)
    assert torch.allclose(Backbone(vit, pool=pooling_for("beit"))(images), tokens[:, 1:].mean(dim=1), atol=1e-6)
    assert torch.allclose(Backbone(vit, pool=pooling_for("simclr"))(images), tokens[:, 0], atol=1e-6)


@pytest.mark.parametrize("kind", ["kmeans", "dvae"])
def test_both_tokenizer_kinds_keep_the_patch_prototypes_apart_and_round_trip(kind, tmp_path):
    """Images tiled from 4 patch prototypes plus a little noise: no token may stand for two prototypes."""
    generator = torch.Generator().manual_seed(0)
    prototypes = 2 * torch.randn(4, 16, generator=generator)

    def tiled(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        choice = torch.randint(0, 4, (count * 49,), generator=generator)
        patches = prototypes[choice] + 0.05 * torch.randn(count * 49, 16, generator=generator)
        images = torch.nn.functional.fold(patches.view(count, 49, 16).transpose(1, 2), (28, 28), 4, stride=4)
        return images, choice

    held_out, truth = tiled(50)
    tokenizer = train_tokenizer(tiled(200)[0], patch_size=4, codebook_size=8, dataset="test", kind=kind,
                                held_out=held_out)  # fmt: skip
    info = tokenizer.info
    assert info.kind == kind and info.reconstruction_mse < 0.05 and 3.5 < info.perplexity <= 8
    tokens = tokenizer(held_out).flatten()
    for token in tokens.unique():
        assert len(truth[tokens == token].unique()) == 1  # each token names one prototype
    tokenizer.save(tmp_path / "tokens.safetensors")
    again = PatchTokenizer.load(tmp_path / "tokens.safetensors")
    assert again.info == info and torch.equal(again(held_out), tokenizer(held_out))
    assert again.fingerprint() == tokenizer.fingerprint()  # the file's, whatever its name: a run's record
    other = train_tokenizer(tiled(200)[0], patch_size=4, codebook_size=8, dataset="test", kind=kind, seed=1)
    assert other.fingerprint() != tokenizer.fingerprint()


def test_the_pixel_target_variant_regresses_the_masked_patches_pixels_only():
    from deit.models import create_model
    from deit.ssl.backbone import Backbone
    from deit.ssl.beit import BEiT

    torch.manual_seed(0)
    beit = BEiT(Backbone(create_model("deit_pico_patch4_28", num_classes=10, in_chans=1, img_size=28)), None)
    assert beit.token_head.out_features == 16  # one 4 x 4 gray patch
    images = torch.randn(2, 1, 28, 28)
    masks = BlockMasks(grid=7)(torch.arange(2))
    predicted = beit.token_head(beit.patch_features(images, masks))  # (B, 49, 16): every position
    pixels = patchify(images, 4)
    by_hand = (predicted[masks] - pixels[masks]).abs().mean()
    assert torch.allclose(beit.losses(images, masks)["loss"], by_hand)
    assert not torch.allclose(by_hand, (predicted - pixels).abs().mean())  # the visible positions would count
