"""The vision transformer: equivalence with timm, gradients, outputs, variants, DropPath, sizes."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import deit
from deit.models import EVAL_OUTPUTS, VARIANTS, VisionTransformer, create_model, fuse_heads, is_deit_model, list_models
from deit.models.cnn import SMALL_RESNETS
from deit.models.layers import DropPath

PICO = "deit_pico_patch7_28"
PICO_DISTILLED = "deit_pico_distilled_patch7_28"


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- equivalence with timm -----------------------------------------------------------------------


def _perturbed_timm_model(name: str) -> nn.Module:
    """timm's model with every parameter moved off its init (biases non-zero, norms not one)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.usefixtures("fast_init")
def test_matches_timm_distilled_tiny_in_eval_and_train_mode():
    name = "deit_tiny_distilled_patch16_224"
    reference = _perturbed_timm_model(name)
    ours = deit.create_model(name)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected, got = reference.eval()(x), ours.eval()(x)
    assert got.shape == (2, 1000)
    assert expected.abs().max() > 0.1  # the comparison below is not between two near-zero tensors
    assert (got - expected).abs().max() < 1e-4

    reference.set_distilled_training(True)
    with torch.no_grad():
        expected_cls, expected_dist = reference.train()(x)
        got_cls, got_dist = ours.train()(x)
    assert (got_cls - expected_cls).abs().max() < 1e-4
    assert (got_dist - expected_dist).abs().max() < 1e-4
    assert (got_cls - got_dist).abs().max() > 1e-3  # the two heads really are different


@pytest.mark.usefixtures("fast_init")
def test_matches_timm_plain_small_in_eval_and_train_mode():
    name = "deit_small_patch16_224"
    reference = _perturbed_timm_model(name)
    ours = deit.create_model(name)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    for train in (False, True):  # no dropout or drop path by default: both modes are deterministic
        reference.train(train)
        ours.train(train)
        with torch.no_grad():
            expected, got = reference(x), ours(x)
        assert isinstance(got, torch.Tensor) and got.shape == (2, 1000)
        assert expected.abs().max() > 0.1
        assert (got - expected).abs().max() < 1e-4


# --- gradients and attention implementations -----------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("name", [PICO, PICO_DISTILLED])
def test_every_parameter_gets_a_gradient(name, attn_impl):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=1, drop_path_rate=0.2, attn_impl=attn_impl).train()
    outputs = model(torch.randn(8, 1, 28, 28))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert len(outputs) == (2 if "distilled" in name else 1)
    targets = torch.arange(8) % 5
    sum(nn.functional.cross_entropy(out, targets) for out in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", [PICO, PICO_DISTILLED])
def test_sdpa_and_math_attention_agree(name):
    torch.manual_seed(0)
    sdpa = create_model(name, num_classes=7, attn_impl="sdpa")
    math_model = create_model(name, num_classes=7, attn_impl="math")
    math_model.load_state_dict(sdpa.state_dict())
    assert math_model.blocks[0].attn.impl == "math" and sdpa.blocks[0].attn.impl == "sdpa"
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        for train in (False, True):
            a, b = sdpa.train(train)(x), math_model.train(train)(x)
            for left, right in zip(
                a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
            ):
                assert torch.allclose(left, right, atol=1e-5, rtol=0)


def test_unknown_attention_implementation_raises():
    with pytest.raises(ValueError, match="flash"):
        create_model(PICO, attn_impl="flash")


def test_drop_path_rate_is_linear_from_zero_to_the_last_block():
    model = create_model(PICO, drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / (len(rates) - 1) for i in range(len(rates))])


# --- outputs -------------------------------------------------------------------------------------


def test_output_shapes_of_distilled_model():
    model = create_model(PICO_DISTILLED, num_classes=6, in_chans=1)
    x = torch.randn(4, 1, 28, 28)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (4, 6)
    assert model.eval()(x).shape == (4, 6)
    heads = model.forward_heads(x)
    assert set(heads) == {"cls", "dist"}
    assert heads["cls"].shape == heads["dist"].shape == (4, 6)


def test_output_shapes_of_plain_model():
    model = create_model(PICO, num_classes=6, in_chans=1)
    x = torch.randn(4, 1, 28, 28)
    assert isinstance(model.train()(x), torch.Tensor) and model(x).shape == (4, 6)
    assert model.eval()(x).shape == (4, 6)
    assert set(model.forward_heads(x)) == {"cls"}
    assert model.dist_token is None and model.head_dist is None and not model.distilled


@pytest.mark.parametrize("eval_output", EVAL_OUTPUTS)
def test_each_eval_output(eval_output):
    torch.manual_seed(0)
    model = create_model(PICO_DISTILLED, num_classes=5, eval_output=eval_output).eval()
    assert model.eval_output == eval_output
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        heads = model.forward_heads(x)
        out = model(x)
    cls, dist = heads["cls"], heads["dist"]
    expected = {
        "cls": cls,
        "dist": dist,
        "avg_logits": (cls + dist) / 2,
        "softmax_sum": ((cls.softmax(-1) + dist.softmax(-1)) / 2).log(),
    }[eval_output]
    assert out.shape == (3, 5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_eval_output_can_be_switched_after_building():
    torch.manual_seed(0)
    model = create_model(PICO_DISTILLED, num_classes=5).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        heads = model.forward_heads(x)
        model.eval_output = "dist"
        assert torch.equal(model(x), heads["dist"])
        model.eval_output = "cls"
        assert torch.equal(model(x), heads["cls"])


def test_softmax_sum_differs_from_avg_logits_as_the_paper_says():
    # class 1: cls is sure (softmax 0.987), dist says no; class 0: dist fairly sure (0.881), cls says no.
    cls = torch.tensor([[0.0, 5.0, 0.0]])
    dist = torch.tensor([[2.0, -10.0, 0.0]])

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    summed = [a + b for a, b in zip(softmax([0.0, 5.0, 0.0]), softmax([2.0, -10.0, 0.0]), strict=True)]
    assert max(range(3), key=summed.__getitem__) == 1  # sum of softmaxes picks class 1
    assert max(range(3), key=[1.0, -2.5, 0.0].__getitem__) == 0  # mean of logits picks class 0

    fused = fuse_heads(cls, dist, "softmax_sum")
    assert fused.argmax(-1).item() == 1
    assert fuse_heads(cls, dist, "avg_logits").argmax(-1).item() == 0
    assert torch.allclose(fused, torch.tensor([[math.log(s / 2) for s in summed]]), atol=1e-6)
    assert torch.allclose(fused.exp().sum(-1), torch.ones(1))  # log-probabilities

    # and the model in eval mode does the same when its heads give these logits
    model = create_model(PICO_DISTILLED, num_classes=3, eval_output="softmax_sum").eval()
    model.forward_heads = lambda x: {"cls": cls, "dist": dist}
    assert model(torch.zeros(1, 3, 28, 28)).argmax(-1).item() == 1
    model.eval_output = "avg_logits"
    assert model(torch.zeros(1, 3, 28, 28)).argmax(-1).item() == 0


def test_invalid_eval_output_raises():
    with pytest.raises(ValueError, match="median"):
        create_model(PICO_DISTILLED, eval_output="median")
    model = create_model(PICO_DISTILLED)
    with pytest.raises(ValueError, match="median"):
        model.eval_output = "median"
    with pytest.raises(ValueError, match="median"):
        fuse_heads(torch.zeros(1, 2), torch.zeros(1, 2), "median")


# --- inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_any_channel_count(in_chans):
    model = create_model(PICO_DISTILLED, num_classes=4, in_chans=in_chans).eval()
    assert model.patch_embed.proj.in_channels == in_chans
    assert model(torch.randn(2, in_chans, 28, 28)).shape == (2, 4)


def test_wrong_input_size_raises_naming_the_size():
    model = create_model(PICO, in_chans=1)
    with pytest.raises(ValueError, match="28x28.*32x32"):
        model(torch.randn(1, 1, 32, 32))


def test_img_size_override_changes_the_grid():
    model = create_model("deit_pico_patch4_32", img_size=48)
    assert model.patch_embed.grid_size == 12
    assert model.pos_embed.shape == (1, 1 + 144, 64)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    with pytest.raises(ValueError, match="not a multiple"):
        create_model("deit_pico_patch7_28", img_size=30)


# --- names and the registry ----------------------------------------------------------------------


def test_named_variants_exist():
    names = set(list_models())
    for size in ("tiny", "small", "base"):
        assert f"deit_{size}_patch16_224" in names
        assert f"deit_{size}_distilled_patch16_224" in names
    assert {"deit_base_patch16_384", "deit_base_distilled_patch16_384"} <= names
    assert list_models("patch4_28")
    assert all("patch4_28" in name for name in list_models("patch4_28"))
    assert VARIANTS["deit_base_distilled_patch16_384"].img_size == 384
    assert VARIANTS["deit_base_distilled_patch16_384"].distilled
    assert not VARIANTS["deit_base_patch16_384"].distilled
    assert is_deit_model(PICO) and not is_deit_model("resnet18")


def test_table1_shapes():
    # width, depth, heads of the paper's Table 1
    for size, (dim, depth, heads) in {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}.items():
        config = VARIANTS[f"deit_{size}_patch16_224"]
        assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (dim, depth, heads, 16)


def test_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match="deit_teeny_patch16_224"):
        create_model("deit_teeny_patch16_224")


def test_timm_cnn_by_name():
    model = create_model("resnet18", num_classes=10, in_chans=1)
    assert isinstance(model, timm.models.resnet.ResNet)
    assert model.conv1.in_channels == 1
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_timm_prefix_forces_timm_implementation():
    model = create_model("timm:deit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1)
    assert not isinstance(model, VisionTransformer)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_override_raises_type_error():
    with pytest.raises(TypeError, match=r"\['drop_path'\]"):
        create_model(PICO, drop_path=0.1)  # the field is drop_path_rate


def test_small_overrides_are_allowed():
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=2, img_size=32)
    assert len(model.blocks) == 2 and model.num_classes == 10
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pretrained_true_is_refused_for_our_variants():
    with pytest.raises(ValueError, match="path"):
        create_model(PICO, pretrained=True)


def test_pretrained_path_loads_weights(tmp_path):
    source = create_model(PICO, num_classes=3)
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")
    loaded = create_model(PICO, num_classes=3, pretrained=str(tmp_path / "official.pth"))
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# --- DropPath ------------------------------------------------------------------------------------


def test_drop_path_is_identity_in_eval_and_when_zero():
    x = torch.randn(16, 5, 8)
    layer = DropPath(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(400, 3, 4)
    out = layer(x)
    per_sample = out.reshape(400, -1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 2.0).all(dim=1)
    assert bool((dropped | kept).all()), "each sample is either dropped whole or scaled by 1 / keep_prob"
    assert 120 < int(dropped.sum()) < 280  # about half, binomial(400, 0.5) is within 8 sigma
    assert out.mean().item() == pytest.approx(1.0, abs=0.2)  # the expectation is preserved


# --- sizes: the paper's Table 1 ------------------------------------------------------------------


@pytest.mark.usefixtures("fast_init")
@pytest.mark.parametrize(
    ("name", "millions", "tolerance"),
    [("deit_tiny_patch16_224", 5.7, 0.1), ("deit_small_patch16_224", 22.0, 0.1), ("deit_base_patch16_224", 86.0, 1.0)],
)
def test_parameter_count_matches_table1(name, millions, tolerance):
    model = create_model(name, num_classes=1000)
    assert num_params(model) / 1e6 == pytest.approx(millions, abs=tolerance)


def test_timm_transformers_are_built_at_the_input_size_and_cnns_at_any(fast_init):
    vit = create_model("timm:deit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, depth=1)
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    cnn = create_model("resnet10t", num_classes=10, in_chans=1, img_size=28)  # img_size is not passed to a CNN
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(SMALL_RESNETS))
def test_small_image_resnets_keep_the_resolution_and_train_every_parameter(name):
    model = create_model(name, num_classes=10, in_chans=1, drop_rate=0.1)
    zero_init = [m.bn2.weight for m in model.modules() if hasattr(m, "bn2")]
    assert zero_init and all(w.abs().sum() == 0 for w in zero_init)  # each residual block starts as the identity
    for weight in zero_init:
        nn.init.ones_(weight)  # else the residual branches get no gradient at the first step, by design
    images = torch.randn(4, 1, 28, 28)
    assert model.stem(images).shape[-2:] == (28, 28)  # no stride-2 stem, no max-pool: the first stage sees 28 px
    logits = model(images)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert name in list_models("small")
    with pytest.raises(ValueError, match="no stochastic depth"):
        create_model(name, num_classes=10, in_chans=1, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="no published weights"):
        create_model(name, pretrained=True)
