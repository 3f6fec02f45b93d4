"""The teacher: loading from files, freezing, class checks and channel / normalisation conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from deit.checkpoint import FORMAT, CheckpointError
from deit.models import create_model
from deit.teachers import IMAGENET_MEAN, IMAGENET_STD, InputSpec, Teacher, TeacherMismatchError, build_teacher

CNN = "resnet10t"  # timm's smallest ResNet: 5M parameters, builds in a tenth of a second
FMNIST_INPUT = InputSpec(1, (0.2860,), (0.3530,))


def make_cnn(num_classes: int = 10, in_chans: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(CNN, num_classes=num_classes, in_chans=in_chans)
    with torch.no_grad():  # give the batch norms non-trivial statistics, so eval and train mode differ
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_bare(model: nn.Module, path: Path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def save_official(model: nn.Module, path: Path) -> str:
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def save_deit_checkpoint(model: nn.Module, path: Path, *, name: str, class_names, in_chans: int, mean, std) -> str:
    """A `deit train`-style checkpoint, written by hand with the keys model_from_checkpoint reads."""
    state = {
        "format": FORMAT,
        "version": 1,
        "model": model.state_dict(),
        "model_spec": {
            "name": name,
            "num_classes": len(class_names),
            "in_chans": in_chans,
            "img_size": None,
            "options": {},
        },
        "data": {
            "dataset": "imagefolder",
            "class_names": list(class_names),
            "mean": list(mean),
            "std": list(std),
            "input_size": 28,
        },
    }
    torch.save(state, path)
    return str(path)


def build(teacher_model, teacher_path, *, student_input=FMNIST_INPUT, num_classes=10, class_names=None, **kwargs):
    return build_teacher(
        teacher_model,
        teacher_path,
        student_input=student_input,
        num_classes=num_classes,
        class_names=class_names,
        input_size=28,
        **kwargs,
    )


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [save_bare, save_official], ids=["bare-state-dict", "official-format"])
def test_teacher_from_weights_file_has_the_saved_weights(tmp_path, save):
    network = make_cnn(in_chans=1)
    teacher = build(CNN, save(network, tmp_path / "teacher.pth"))
    assert teacher.teacher_input.in_chans == 1
    for (name, expected), (_, got) in zip(
        network.state_dict().items(), teacher.model.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, got), name
    # the same network on the same (converted) input: the teacher really is the saved one
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(teacher(x), network(teacher.to_teacher_input(x)), atol=1e-5)


def test_teacher_with_module_prefixed_weights(tmp_path):
    network = make_cnn()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in network.state_dict().items()}}, path)
    teacher = build(CNN, str(path))
    assert torch.equal(teacher.model.fc.weight, network.fc.weight)


def test_teacher_is_frozen_and_stays_in_eval_mode(tmp_path):
    teacher = build(CNN, save_bare(make_cnn(), tmp_path / "t.pth"))
    assert all(not module.training for module in teacher.model.modules())
    teacher.train()
    assert not teacher.training
    assert all(not module.training for module in teacher.modules())
    teacher.train(True)
    assert not teacher.model.training
    assert all(not param.requires_grad for param in teacher.parameters())


def test_teacher_wrapper_reports_eval_mode_from_the_start():
    teacher = Teacher(nn.Identity(), FMNIST_INPUT, FMNIST_INPUT)
    assert not teacher.training


def test_teacher_builds_no_graph(tmp_path):
    teacher = build(CNN, save_bare(make_cnn(), tmp_path / "t.pth"))
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    out = teacher(x)
    assert out.shape == (2, 10)
    assert not out.requires_grad
    assert out.grad_fn is None


def test_teacher_eval_mode_is_deterministic_under_train_call(tmp_path):
    # batch norm in train mode would use batch statistics: outputs would depend on the batch composition
    teacher = build(CNN, save_bare(make_cnn(), tmp_path / "t.pth")).train()
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(teacher(x)[:2], teacher(x[:2]), atol=1e-5)


@pytest.mark.parametrize("teacher_classes", [7, 1000])
def test_class_count_mismatch_names_both_numbers(tmp_path, teacher_classes):
    path = save_bare(make_cnn(num_classes=teacher_classes), tmp_path / "t.pth")
    with pytest.raises(TeacherMismatchError) as error:
        build(CNN, path, num_classes=10)
    assert str(teacher_classes) in str(error.value)
    assert "10" in str(error.value)


def test_teacher_model_without_path_or_pretrained_is_refused():
    with pytest.raises(ValueError, match="teaches nothing"):
        build(CNN, None)


def test_no_teacher_at_all_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        build(None, None)


def test_weights_file_without_model_name_asks_for_teacher_model(tmp_path):
    path = save_official(make_cnn(), tmp_path / "t.pth")
    with pytest.raises(TeacherMismatchError, match="--teacher-model"):
        build(None, path)


def test_missing_teacher_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth does not exist"):
        build(CNN, str(tmp_path / "nowhere.pth"))


# --- deit checkpoints ----------------------------------------------------------------------------


def test_teacher_from_deit_checkpoint_uses_its_model_and_normalisation(tmp_path):
    network = make_cnn(num_classes=3, in_chans=1)
    path = save_deit_checkpoint(
        network, tmp_path / "ckpt.pth", name=CNN, class_names=["a", "b", "c"], in_chans=1, mean=[0.5], std=[0.25]
    )
    student = InputSpec(1, (0.5,), (0.25,))
    teacher = build(None, path, student_input=student, num_classes=3, class_names=["a", "b", "c"])
    assert teacher.teacher_input == student
    assert not teacher.needs_conversion
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(teacher(x), network(x), atol=1e-5)


def test_deit_checkpoint_of_a_vit_teacher(tmp_path):
    torch.manual_seed(0)
    network = create_model("deit_pico_patch7_28", num_classes=3, in_chans=1).eval()
    path = tmp_path / "vit.pth"
    save_deit_checkpoint(
        network, path, name="deit_pico_patch7_28", class_names="abc", in_chans=1, mean=[0.5], std=[0.25]
    )
    teacher = build(
        None, str(path), student_input=InputSpec(1, (0.5,), (0.25,)), num_classes=3, class_names=list("abc")
    )
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(teacher(x), network(x), atol=1e-5)


@pytest.mark.parametrize("student_classes", [["a", "x", "c"], ["c", "b", "a"]], ids=["renamed", "reordered"])
def test_class_names_mismatch_from_deit_checkpoint(tmp_path, student_classes):
    path = save_deit_checkpoint(
        make_cnn(num_classes=3),
        tmp_path / "ckpt.pth",
        name=CNN,
        class_names=["a", "b", "c"],
        in_chans=1,
        mean=[0.5],
        std=[0.25],
    )
    with pytest.raises(TeacherMismatchError) as error:
        build(None, path, num_classes=3, class_names=student_classes)
    message = str(error.value)
    first = next(i for i, (a, b) in enumerate(zip(["a", "b", "c"], student_classes, strict=True)) if a != b)
    assert repr(["a", "b", "c"][first]) in message and repr(student_classes[first]) in message


# --- channel and normalisation conversion --------------------------------------------------------


def test_three_channel_teacher_on_one_channel_student(tmp_path):
    network = make_cnn(in_chans=3)
    teacher = build(CNN, save_bare(network, tmp_path / "rgb.pth"))
    assert teacher.teacher_input == InputSpec(3, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(1)
    student_batch = torch.randn(2, 1, 28, 28)

    # by hand: undo the student's normalisation, repeat the gray channel, apply ImageNet's per channel
    pixels = student_batch * 0.3530 + 0.2860
    expected_input = torch.empty(2, 3, 28, 28)
    for c in range(3):
        expected_input[:, c] = (pixels[:, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    converted = teacher.to_teacher_input(student_batch)
    assert converted.shape == (2, 3, 28, 28)
    assert torch.allclose(converted, expected_input, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(teacher(student_batch), network(expected_input), atol=1e-4)


def test_one_channel_teacher_on_rgb_student(tmp_path):
    network = make_cnn(in_chans=1)
    teacher = build(
        CNN, save_bare(network, tmp_path / "gray.pth"), student_input=InputSpec(3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    )
    gray_mean, gray_std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # a 1-channel timm model: ImageNet's averaged
    assert teacher.teacher_input.mean == pytest.approx((gray_mean,))
    assert teacher.teacher_input.std == pytest.approx((gray_std,))
    x = torch.randn(2, 3, 28, 28)
    r, g, b = x[:, 0] * 0.2 + 0.5, x[:, 1] * 0.25 + 0.4, x[:, 2] * 0.3 + 0.3
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601, as PIL's convert("L")
    expected_input = ((luma - gray_mean) / gray_std)[:, None]
    assert torch.allclose(teacher.to_teacher_input(x), expected_input, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(teacher(x), network(expected_input), atol=1e-4)


def test_same_input_spec_means_no_conversion():
    teacher = Teacher(nn.Identity(), FMNIST_INPUT, FMNIST_INPUT)
    x = torch.randn(2, 1, 4, 4)
    assert not teacher.needs_conversion
    assert teacher.to_teacher_input(x) is x


def test_unconvertible_channel_counts_are_refused():
    with pytest.raises(TeacherMismatchError, match="channel"):
        Teacher(nn.Identity(), InputSpec(4, (0.5,) * 4, (0.5,) * 4), InputSpec(3, IMAGENET_MEAN, IMAGENET_STD))


def test_four_channel_student_with_one_channel_teacher_is_refused():
    with pytest.raises(TeacherMismatchError, match="channel"):
        Teacher(nn.Conv2d(1, 2, 1), InputSpec(4, (0.5,) * 4, (0.5,) * 4), InputSpec(1, (0.5,), (0.5,)))
