"""Surviving faults: SIGKILL at any step then --resume, kills while saving, SIGTERM, NaN, bad image files.

The kill tests run training in a child process that SIGKILLs itself right
after logging a chosen step, resume it, and compare the result bit for bit with
an uninterrupted run: weights, EMA, optimizer state, per-step and per-epoch
losses. The recipe is on: RandAugment, Random Erasing, Mixup/CutMix,
stochastic depth, repeated augmentation, EMA, hard distillation, and two
data-loader worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch

import deit.losses
from conftest import needs_fashion_mnist, write_image
from deit.checkpoint import load_checkpoint, save_checkpoint
from deit.cli import main
from deit.config import TrainConfig, with_overrides
from deit.engine import NonFiniteLossError
from deit.interrupts import StopRequest
from deit.training import RunInterrupted, fit

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
STEPS_PER_EPOCH = 6  # 3 classes x 32 images, batch 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of 3 classes: 32 train and 4 val images each, of mixed sizes and modes."""
    root = tmp_path_factory.mktemp("data")
    for split, count in (("train", 32), ("val", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                mode = ("RGB", "L", "CMYK")[i % 3]
                fmt, suffix = ("JPEG", ".jpg") if mode == "CMYK" else ("PNG", ".png")
                write_image(root / split / name / f"{i}{suffix}", mode, fmt, (26 + i % 7, 30), seed=100 * label + i)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=len(CLASSES)).state_dict(), path)
    return path


def recipe(folder: Path, teacher: Path, out: Path, **overrides) -> dict:
    values = {
        "model.name": "deit_pico_distilled_patch7_28",
        "model.drop_path": 0.1,
        "data.dataset": "imagefolder",
        "data.path": str(folder),
        "data.input_size": 28,
        "data.num_workers": 2,
        "data.decode_budget_gb": 0.0,  # the per-image path: files decoded and augmented in loader workers
        "augment.rand_augment": "rand-m9-mstd0.5-inc1",
        "augment.random_erasing": 0.25,
        "augment.mixup": 0.8,
        "augment.cutmix": 1.0,
        "augment.repeated_aug": 3,
        "optim.epochs": 2,
        "optim.batch_size": 16,
        "optim.warmup_epochs": 1,
        "optim.ema_decay": 0.9,
        "distill.type": "hard",
        "distill.teacher_model": "resnet10t",
        "distill.teacher_path": str(teacher),
        "run.progress": False,
        "run.eval_teacher": False,
        "run.output_dir": str(out),
        "run.checkpoint_steps": 2,
    }
    values.update(overrides)
    return values


# A child process: train with these settings, and SIGKILL itself right after logging step KILL_AT.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import deit.training
    from deit.config import TrainConfig, with_overrides

    values, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
    log_step = deit.training.RunLogs.step

    def step_then_die(self, record):
        log_step(self, record)
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    deit.training.RunLogs.step = step_then_die
    deit.training.fit(with_overrides(TrainConfig(), values))
    """
)


def run_child(values: dict, kill_at: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(values), str(kill_at)], env=env, capture_output=True, text=True
    )
    return done.returncode


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise: weights, EMA, optimizer state; exactly equal per-step and per-epoch losses."""
    first, second = load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth")
    for key in ("model", "model_ema"):
        if first[key] is None:  # a run without EMA
            assert second[key] is None
            continue
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key}.{name}"
    for slot, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][slot][name]), f"optimizer {slot}.{name}"
    assert read_jsonl(a / "steps.jsonl") == read_jsonl(b / "steps.jsonl")

    def train_losses(folder: Path) -> list[dict]:
        timing = ("images_per_sec", "seconds")
        return [{k: v for k, v in r["train"].items() if k not in timing} for r in read_jsonl(folder / "metrics.jsonl")]

    assert train_losses(a) == train_losses(b)
    assert [r["val"] for r in read_jsonl(a / "metrics.jsonl")] == [r["val"] for r in read_jsonl(b / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(folder, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_child(recipe(folder, teacher, out), kill_at=-1) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    [
        2,  # mid-epoch: the resumed run starts from the checkpoint after step 1 and repeats step 2
        4,  # the same, later in the epoch (checkpoints every 2 steps)
        STEPS_PER_EPOCH - 1,  # the epoch's last step, before its evaluation and checkpoint
        STEPS_PER_EPOCH + 1,  # in the second epoch, one step after the first epoch's checkpoint
    ],
)
def test_sigkill_at_any_step_then_resume_is_bit_identical(folder, teacher, uninterrupted, tmp_path, kill_at):
    out = tmp_path / "run"
    values = recipe(folder, teacher, out)
    assert run_child(values, kill_at) == -signal.SIGKILL
    assert read_jsonl(out / "steps.jsonl")[-1]["step"] == kill_at  # it did get that far, and died there
    fit(with_overrides(TrainConfig(), {**values, "run.resume": "auto"}))
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_resume_with_more_loader_workers_is_still_identical(folder, teacher, uninterrupted, tmp_path):
    """Augmentation depends on (seed, epoch, position) only, not on which worker decodes the image."""
    out = tmp_path / "run"
    values = recipe(folder, teacher, out)
    assert run_child(values, kill_at=3) == -signal.SIGKILL
    fit(with_overrides(TrainConfig(), {**values, "run.resume": "auto", "data.num_workers": 0}))
    assert_same_run(uninterrupted, out)


@pytest.fixture(scope="module")
def fashion_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fashion_teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict(), path)
    return path


def in_memory_recipe(teacher: Path, out: Path, **overrides) -> dict:
    """The recipe on in-memory Fashion-MNIST: crop, flip, RandAugment and Random Erasing run whole-batch."""
    data = {"data.dataset": "fashion-mnist", "data.path": None, "data.input_size": None, "data.train_subset": 96}
    return recipe(Path("unused"), teacher, out, **{**data, "distill.teacher_path": str(teacher), **overrides})


@needs_fashion_mnist
@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_with_whole_batch_augmentation(fashion_teacher, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_child(in_memory_recipe(fashion_teacher, whole), kill_at=-1) == 0
    values = in_memory_recipe(fashion_teacher, resumed)
    assert run_child(values, kill_at=4) == -signal.SIGKILL
    config = with_overrides(TrainConfig(), {**values, "run.resume": "auto"})
    assert config.augment.rand_augment and config.augment.batched  # the whole-batch path, with the paper's policy
    fit(config)
    assert_same_run(whole, resumed)


# --- atomic checkpoints under repeated kills ---------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import sys, torch
    from deit.checkpoint import save_checkpoint
    path = sys.argv[1]
    for version in range(10**9):
        save_checkpoint({"version": version, "weights": torch.full((500_000,), float(version))}, path)
        print(version, flush=True)
    """
)


def test_kills_while_saving_always_leave_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"version": -1, "weights": torch.full((500_000,), -1.0)}, path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    last_seen = -1
    for attempt in range(8):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # at least one save completed: the next one is in flight when the kill lands
        time.sleep(0.01 * attempt)
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = load_checkpoint(path)  # never torn: an old or a new version, whole
        assert torch.equal(state["weights"], torch.full((500_000,), float(state["version"])))
        assert state["version"] >= 0
        last_seen = max(last_seen, state["version"])
    assert last_seen >= 1  # the kills landed after several saves, not only around the first one
    save_checkpoint({"version": 99, "weights": torch.zeros(1)}, path)  # leftovers of killed saves are cleared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


# --- SIGTERM and non-finite losses ----------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(folder, teacher, tmp_path):
    out = tmp_path / "run"
    values = recipe(folder, teacher, out, **{"optim.epochs": 50, "run.checkpoint_steps": None})
    config = tmp_path / "config.yaml"
    from deit.config import save_config

    save_config(with_overrides(TrainConfig(), values), config)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "deit", "train", "--config", str(config)], env=env, stderr=subprocess.PIPE, text=True
    )
    steps = out / "steps.jsonl"
    deadline = time.monotonic() + 120
    while not (steps.exists() and len(steps.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert child.returncode == 143, stderr
    assert elapsed < 30  # torchrun's grace period before SIGKILL
    assert "stopped by SIGTERM" in stderr
    state = load_checkpoint(out / "checkpoint.pth")
    logged = read_jsonl(steps)
    assert state["epoch"] * STEPS_PER_EPOCH + state["epoch_step"] == logged[-1]["step"] + 1  # the last logged step
    short = with_overrides(TrainConfig(), {**values, "optim.epochs": state["epoch"] + 1, "run.resume": "auto"})
    result = fit(short)  # and it continues from there
    assert [r["epoch"] for r in result.history][-1] == state["epoch"] + 1


def test_stop_request_in_process_raises_after_writing_the_checkpoint(folder, teacher, tmp_path):
    stop = StopRequest()
    stop.request(signal.SIGTERM)  # as if the signal came during the first step
    values = recipe(folder, teacher, tmp_path / "run", **{"data.num_workers": 0})
    with pytest.raises(RunInterrupted) as raised:
        fit(with_overrides(TrainConfig(), values), stop=stop)
    assert raised.value.exit_code == 143
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch_step"] == 1


def test_nan_loss_stops_without_writing_a_nan_checkpoint(folder, teacher, tmp_path, monkeypatch):
    values = recipe(folder, teacher, tmp_path / "run", **{"data.num_workers": 0, "run.checkpoint_steps": None})
    fit(with_overrides(TrainConfig(), {**values, "optim.epochs": 1}))
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    real = deit.losses.DistillationLoss.components
    calls = []

    def poisoned(self, *args, **kwargs):
        losses = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(deit.losses.DistillationLoss, "components", poisoned)
    with pytest.raises(NonFiniteLossError, match=f"step {STEPS_PER_EPOCH + 2}"):
        fit(with_overrides(TrainConfig(), {**values, "run.resume": "auto"}))
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == before
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


# --- bad image files --------------------------------------------------------------------------------------


def break_some_files(root: Path) -> list[Path]:
    """A zero-byte file, a truncated PNG and a text file named .jpg among the training images."""
    target = root / "train" / "bee"
    good = next(target.glob("*.png")).read_bytes()
    broken = [target / "empty.png", target / "truncated.png", target / "notes.jpg"]
    broken[0].write_bytes(b"")
    broken[1].write_bytes(good[: len(good) // 3])
    broken[2].write_text("this is not an image")
    return broken


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "data"))


def test_verify_data_lists_every_unreadable_file(folder, tmp_path, capsys):
    root = copy_folder(folder, tmp_path)
    broken = break_some_files(root)
    assert main(["verify-data", "--data-path", str(root)]) == 1
    captured = capsys.readouterr()
    listed = [line.split(": ")[0] for line in captured.out.splitlines()]
    assert sorted(listed) == sorted(map(str, broken))
    assert "111 image files checked, 3 unreadable" in captured.err
    assert main(["verify-data", "--data-path", str(folder)]) == 0


def test_bad_files_error_names_the_file_and_skip_trains_without_them(folder, teacher, tmp_path, capsys, caplog):
    root = copy_folder(folder, tmp_path)
    break_some_files(root)
    args = ["train", "--data-set", "imagefolder", "--data-path", str(root), "--input-size", "28"]
    args += ["--model", "deit_pico_patch7_28", "--epochs", "1", "--batch-size", "90", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "error")]) == 2
    assert str(root / "train" / "bee") in capsys.readouterr().err  # names one of the broken files
    assert main([*args, "--output-dir", str(tmp_path / "skip"), "--bad-files", "skip"]) == 0
    assert "left out 3 unreadable train images" in caplog.text
    record = read_jsonl(tmp_path / "skip" / "metrics.jsonl")[0]
    assert record["train"]["steps"] == 1 and record["val"]["num_samples"] == 12
