"""CPC: patches, the context down each column, and a run whose InfoNCE falls below chance."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_fashion_mnist
from deit.errors import ModelError
from deit.models import create_model
from deit.ssl.backbone import Backbone
from deit.ssl.cpc import CPC


def small_cpc(**options) -> CPC:
    torch.manual_seed(0)
    return CPC(Backbone(create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28)), image_size=28,
               **options)  # fmt: skip


def test_the_patches_overlap_by_half_and_are_encoded_row_by_row():
    cpc = small_cpc(patch=12)  # stride 6: a 3 x 3 grid on 28 px
    assert (cpc.grid, cpc.stride) == (3, 6)
    images = torch.zeros(1, 1, 28, 28)
    images[..., 6:18, 12:24] = 1.0  # exactly the patch in row 1, column 2
    seen = []
    cpc.backbone.forward = lambda patches: (seen.append(patches), patches.flatten(1).sum(1, keepdim=True))[1]
    encodings = cpc.encode_patches(images)
    assert encodings.shape == (1, 3, 3, 1) and seen[0].shape == (9, 1, 12, 12)
    assert encodings[0, 1, 2, 0] == 144 and encodings.flatten().argmax() == 1 * 3 + 2


def test_the_context_at_a_row_has_not_seen_the_rows_below():
    cpc = small_cpc().eval()
    images = torch.randn(2, 1, 28, 28)
    z = cpc.encode_patches(images)
    columns = z.transpose(1, 2).reshape(-1, cpc.grid, z.shape[-1])
    changed = columns.clone()
    changed[:, -1] += 10  # the last row only
    first, second = cpc.context(columns)[0], cpc.context(changed)[0]
    assert torch.allclose(first[:, :-1], second[:, :-1]) and not torch.allclose(first[:, -1], second[:, -1])


def test_cpc_refuses_a_vit_and_a_grid_too_small_for_its_steps():
    vit = Backbone(create_model("deit_pico_patch7_28", num_classes=10, in_chans=1, img_size=28))
    with pytest.raises(ModelError, match="give a CNN"):
        CPC(vit, image_size=28)
    with pytest.raises(ModelError, match="cannot predict 3 rows ahead"):
        small_cpc(steps=3)  # 14 px patches: a 3 x 3 grid


@needs_fashion_mnist
def test_a_cpc_run_predicts_the_rows_below_better_than_chance(tmp_path):
    import json

    from deit.training import fit
    from test_ssl import pretrain_config

    result = fit(
        pretrain_config(
            tmp_path / "cpc", "cpc", **{"model.name": "resnet8_small", "model.drop_path": 0.0, "optim.epochs": 3}
        )
    )
    steps = [json.loads(line) for line in (tmp_path / "cpc" / "steps.jsonl").read_text().splitlines()]
    chance = math.log(64 * 9)  # one true patch among the batch's 64 x 9
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["loss"] < chance - 0.5
    assert result.final["num_samples"] == 10000
