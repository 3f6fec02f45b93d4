"""The command line as a user runs it: help, errors that name the problem, ImageFolder training, eval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deit.cli import main
from deit.errors import DeitError


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "deit", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "demo", "models"):
        assert command in result.stdout
    train_help = subprocess.run(
        [sys.executable, "-m", "deit", "train", "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--teacher-path",
        "--distillation-type",
        "--distillation-alpha",
        "--distillation-tau",
        "--resume",
        "--config",
    ):
        assert flag in train_help.stdout


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data-set", "imagefolder", "--data-path", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err
    assert "Traceback" not in err


def test_wrong_layout_names_what_is_missing(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    code = main(["train", "--data-set", "IMNET", "--data-path", str(tmp_path), "--input-size", "32"])
    assert code == 2
    assert "missing val/" in capsys.readouterr().err


def test_teacher_with_wrong_class_count_is_refused_before_training(tmp_path, capsys, make_image_folder):
    import timm

    root = make_image_folder(per_class={"train": 8, "val": 4})
    teacher_file = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=7).state_dict()}, teacher_file)
    out = tmp_path / "run"
    code = main([
        "train", "--data-set", "imagefolder", "--data-path", str(root), "--input-size", "32",
        "--model", "deit_pico_distilled_patch8_32", "--distillation-type", "hard", "--batch-size", "8",
        "--teacher-model", "resnet10t", "--teacher-path", str(teacher_file), "--output-dir", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "7 classes" in err and "has 3" in err
    assert not (out / "checkpoint.pth").exists()


def test_image_folder_train_then_eval(tmp_path, capsys, make_image_folder):
    root = make_image_folder(classes=("cat", "dog", "fox"), per_class={"train": 8, "val": 4})
    out = tmp_path / "run"
    code = main([
        "train", "--data-set", "imagefolder", "--data-path", str(root), "--input-size", "32",
        "--model", "deit_pico_distilled_patch8_32", "--epochs", "2", "--batch-size", "8",
        "--output-dir", str(out), "--no-progress", "--set", "optim.warmup_epochs=0",
    ])  # fmt: skip
    assert code == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["data"]["class_names"] == ["cat", "dog", "fox"]
    assert state["epoch"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out / "checkpoint.pth"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_samples"] == 12
    assert {"acc1", "cls_acc1", "dist_acc1", "softmax_sum_acc1"} <= set(metrics)
    last_epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["acc1"] == pytest.approx(last_epoch["val"]["acc1"])


def test_config_preset_and_override(tmp_path, capsys):
    from deit.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(
        ["train", "--config", "fashion_mnist", "--epochs", "3", "--distillation-type", "soft", "--set", "optim.lr=1e-3"]
    )
    config = train_config_from_args(args)
    assert config.model.name.startswith("deit_nano_distilled")  # from the preset
    assert config.optim.epochs == 3 and config.distill.type == "soft" and config.optim.lr == 1e-3
    assert config.run.amp == "auto"  # untouched preset value
    several = ["train", "--set", "optim.lr=2e-3", "optim.epochs=7", "--set", "pretrain.clusters=10"]
    config = train_config_from_args(build_parser().parse_args(several))
    assert (config.optim.lr, config.optim.epochs, config.pretrain.clusters) == (2e-3, 7, 10)


def test_unknown_config_key_is_reported(capsys):
    assert main(["train", "--set", "optim.learning_rate=1"]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def test_none_on_the_command_line_switches_a_preset_setting_off():
    from deit.cli import build_parser, train_config_from_args

    preset = train_config_from_args(build_parser().parse_args(["train", "--config", "deit_tiny_imagenet"]))
    assert preset.augment.rand_augment and preset.optim.ema_decay
    args = build_parser().parse_args(
        ["train", "--config", "deit_tiny_imagenet", "--aa", "none", "--model-ema-decay", "none", "--reprob", "0"]
    )
    config = train_config_from_args(args)
    assert config.augment.rand_augment is None and config.optim.ema_decay is None
    assert config.augment.random_erasing == 0.0
    assert config.augment.mixup == preset.augment.mixup  # flags not given keep the preset's values


def _failing_handler(monkeypatch, error: BaseException) -> None:
    from deit.cli import train as train_cli

    def fail(args):
        raise error

    monkeypatch.setattr(train_cli, "run_train", fail)


@pytest.mark.parametrize(
    ("error", "printed"),
    [
        (DeitError("optim.lr = -1 is out of range"), "optim.lr = -1 is out of range"),
        (PermissionError(13, "Permission denied", "data/train/x.png"), "data/train/x.png"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(monkeypatch, capsys, error, printed):
    _failing_handler(monkeypatch, error)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert printed in err and "Traceback" not in err


@pytest.mark.parametrize("bug", [ValueError("shape mismatch in an internal call"), OSError("no file named")])
def test_internal_errors_keep_their_traceback(monkeypatch, bug):
    _failing_handler(monkeypatch, bug)
    with pytest.raises(type(bug)):  # not turned into "bad input": Python prints the traceback and exits 1
        main(["train"])
