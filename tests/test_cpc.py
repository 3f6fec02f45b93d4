"""CPC: patches, the context down each column, and a run whose InfoNCE falls below chance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import needs_fashion_mnist
from deit.errors import ModelError
from deit.models import create_model
from deit.ssl.backbone import Backbone
from deit.ssl.cpc import CPC
from deit.ssl.losses import flush_denormal_gradient


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


class PassThrough(nn.Module):
    """A context that is each patch's own encoding: the GRU's (output, state) with output = input."""

    def forward(self, columns: torch.Tensor) -> tuple[torch.Tensor, None]:
        return columns, None


def test_each_step_predicts_the_patch_exactly_that_many_rows_below():
    cpc = small_cpc(patch=8, steps=3)  # stride 4: a 6 x 6 grid, so an offset off by one still lands on the grid
    batch, grid, dim = 2, cpc.grid, cpc.backbone.dim
    assert grid == 6 and batch * grid * grid <= dim
    # each patch is named by its top-left pixel, which no other patch has as its top-left: (b, row, col) -> 1 + id
    images = torch.zeros(batch, 1, 28, 28)
    for b in range(batch):
        for row in range(grid):
            for col in range(grid):
                images[b, 0, row * cpc.stride, col * cpc.stride] = 1 + (b * grid + row) * grid + col
    cpc.backbone.forward = lambda patches: F.one_hot(patches[:, 0, 0, 0].long() - 1, dim).float()
    cpc.context = PassThrough()

    def predict_rows_below(offset: int) -> None:
        """Each predictor k maps the one-hot of patch (b, row, col) onto that of (b, row + k + offset, col)."""
        with torch.no_grad():
            for step, predictor in enumerate(cpc.predictors, start=1):
                predictor.weight.zero_()
                for b in range(batch):
                    for row in range(grid - step - offset):
                        for col in range(grid):
                            source = (b * grid + row) * grid + col
                            predictor.weight[source + (step + offset) * grid, source] = 50.0

    predict_rows_below(0)
    assert cpc.losses(images)["loss"] < 1e-6  # the true patch scores 50, every other patch 0
    for offset in (-1, 1):  # the target a row too near (the context's own row at step 1) or a row too far
        predict_rows_below(offset)
        assert cpc.losses(images)["loss"] > 10


def test_cpcs_loss_by_hand_on_a_tiny_grid():
    cpc = small_cpc().eval()  # 14 px patches: a 3 x 3 grid, steps 1 and 2
    with torch.no_grad():
        for predictor in cpc.predictors:
            predictor.weight.mul_(10)  # scores far enough apart that the choice of the positive shows
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z = cpc.encode_patches(images)  # (B, row, col, D)
        batch, grid, _, dim = z.shape
        candidates = z.reshape(-1, dim)  # patch (b, row, col) is candidate (b * G + row) * G + col
        by_step = []
        for step, predictor in enumerate(cpc.predictors, start=1):
            terms = []
            for b in range(batch):
                for col in range(grid):
                    context = cpc.context(z[b, :, col].unsqueeze(0))[0][0]  # down the column, top to bottom
                    for row in range(grid - step):
                        scores = candidates @ predictor(context[row])
                        positive = (b * grid + row + step) * grid + col  # ``step`` rows below, same column
                        terms.append(torch.logsumexp(scores, 0) - scores[positive])
            by_step.append(torch.stack(terms).mean())
        assert torch.allclose(cpc.losses(images)["loss"], torch.stack(by_step).mean(), rtol=1e-5)


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


def test_a_softmax_gradient_below_the_smallest_normal_float_is_flushed_to_zero():
    scores = torch.tensor([[0.0, -95.0, -1.0]], requires_grad=True)  # e^-95: a probability no fp32 normal holds
    F.cross_entropy(scores, torch.tensor([0])).backward()
    kept = scores.grad.clone()
    assert 0 < kept[0, 1].abs() < torch.finfo(torch.float32).tiny  # what x86 multiplies slowly

    scores.grad = None
    F.cross_entropy(flush_denormal_gradient(scores), torch.tensor([0])).backward()
    assert scores.grad[0, 1] == 0 and torch.equal(scores.grad[0, [0, 2]], kept[0, [0, 2]])


class MatrixProductInputs(TorchDispatchMode):
    """The denormal values among the inputs of every matrix product, the backward pass's included."""

    def __init__(self) -> None:
        super().__init__()
        self.denormals = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            for value in args:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    magnitude = value.abs()
                    self.denormals += int(((magnitude > 0) & (magnitude < torch.finfo(value.dtype).tiny)).sum())
        return func(*args, **(kwargs or {}))


def test_cpcs_backward_multiplies_no_denormal_once_its_scores_grow_far_apart():
    cpc = small_cpc()
    with torch.no_grad():
        for predictor in cpc.predictors:
            predictor.weight.mul_(1e3)  # as after training: the true patch scores far above the others
    audit = MatrixProductInputs()
    with audit:
        cpc.losses(torch.randn(8, 1, 28, 28))["loss"].backward()
    assert audit.denormals == 0
