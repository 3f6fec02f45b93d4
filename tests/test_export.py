"""deit export: safetensors, TorchScript and ONNX files that predict what the checkpoint predicts."""

from __future__ import annotations

import pytest
import torch

import deit.export
from deit.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from deit.cli import main
from deit.export import ExportError, export_checkpoint, read_description
from deit.models import create_model, fuse_heads

CLASS_NAMES = [f"class{i}" for i in range(5)]


def write_checkpoint(path, name: str = "deit_pico_distilled_patch4_28", in_chans: int = 1, eval_output="avg_logits"):
    """A `deit train`-shaped checkpoint of a randomly initialised model (what export reads from one)."""
    torch.manual_seed(0)
    options = {"eval_output": eval_output} if name.startswith("deit_") else {}
    model = create_model(name, num_classes=len(CLASS_NAMES), in_chans=in_chans, img_size=28, **options)
    state = {
        "format": FORMAT,
        "version": 1,
        "model": model.state_dict(),
        "model_ema": None,
        "model_spec": {"name": name, "num_classes": 5, "in_chans": in_chans, "img_size": 28, "options": options},
        "data": {"dataset": "imagefolder", "class_names": CLASS_NAMES, "mean": [0.5], "std": [0.25], "input_size": 28},
    }
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth")


def reference(checkpoint_path, head: str, images: torch.Tensor) -> torch.Tensor:
    """What the checkpoint's own model predicts with ``head``, computed directly."""
    model = model_from_checkpoint(load_checkpoint(checkpoint_path)).eval()
    with torch.no_grad():
        if head == "fused":
            return model(images)
        heads = model.forward_heads(images)
        return fuse_heads(heads["cls"], heads["dist"], head)


@pytest.mark.parametrize("head", ["fused", "cls", "dist", "softmax_sum"])
def test_onnx_matches_pytorch_at_several_batch_sizes(checkpoint, tmp_path, head):
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_checkpoint(checkpoint, tmp_path / "model.onnx", format="onnx", head=head)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 7):  # the batch axis is dynamic: none of these is the size it was exported with
        images = torch.randn(batch, 1, 28, 28)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        want = reference(checkpoint, head, images)
        assert got.shape == (batch, 5)
        assert (got - want).abs().max().item() < 1e-4
    assert read_description(path)["data"]["class_names"] == CLASS_NAMES


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_with_a_new_batch_size(checkpoint, tmp_path):
    path = export_checkpoint(checkpoint, tmp_path / "model.pt", format="torchscript", head="dist")
    scripted = torch.jit.load(str(path))
    images = torch.randn(5, 1, 28, 28)
    assert torch.allclose(scripted(images), reference(checkpoint, "dist", images), atol=1e-6)
    description = read_description(path)
    assert description["head"] == "dist" and description["data"]["mean"] == [0.5]


def test_safetensors_round_trip_keeps_weights_and_description(checkpoint, tmp_path):
    path = export_checkpoint(checkpoint, tmp_path / "model.safetensors", format="safetensors", head="cls")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    state = load_checkpoint(path)
    original = load_checkpoint(checkpoint)["model"]
    assert state["model"].keys() == original.keys()
    assert all(torch.equal(state["model"][key], original[key]) for key in original)
    model = model_from_checkpoint(state).eval()
    images = torch.randn(2, 1, 28, 28)
    assert model.eval_output == "cls"
    assert torch.equal(model(images), reference(checkpoint, "cls", images))


def test_timm_teacher_exports_with_its_single_output(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "teacher.pth", name="resnet10t", in_chans=3)
    pytest.importorskip("onnxruntime")
    export_checkpoint(checkpoint, tmp_path / "teacher.onnx", format="onnx")  # checks itself against PyTorch
    with pytest.raises(ExportError, match="one output"):
        export_checkpoint(checkpoint, tmp_path / "teacher.pt", format="torchscript", head="cls")


def test_plain_model_has_no_distillation_head_to_export(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "plain.pth", name="deit_pico_patch4_28")
    with pytest.raises(ExportError, match="distilled"):
        export_checkpoint(checkpoint, tmp_path / "plain.onnx", format="onnx", head="dist")


def test_failed_export_keeps_the_file_already_there(checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"an earlier export")

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deit.export, "_save_onnx", failing)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(checkpoint, output, format="onnx")
    assert output.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cli_export_and_errors(checkpoint, tmp_path, capsys):
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
        == 0
    )
    assert (tmp_path / "m.pt").is_file()
    code = main(["export", "--checkpoint", str(tmp_path / "nope.pth"), "--format", "onnx", "--output", "x.onnx"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
