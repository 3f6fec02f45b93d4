"""Whole runs with deit.training.fit: files written, refusing to overwrite, resuming, a teacher, evaluation.

Small and quick: a pico student (4 blocks of width 64 on 4x4 patches of 7 px) on a 512-image
Fashion-MNIST subset, two epochs. Validation runs on the full 10,000-image test set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import deit.evaluation
import deit.training
from conftest import needs_fashion_mnist
from deit.analysis import figures
from deit.checkpoint import FORMAT, Checkpoint, CheckpointError, load_checkpoint, model_from_checkpoint
from deit.config import TrainConfig, load_config, with_overrides
from deit.engine import Precision
from deit.evaluation import evaluate_checkpoint
from deit.run import attention_kernel, build_run
from deit.training import RunError, fit

pytestmark = needs_fashion_mnist

STUDENT = "deit_pico_distilled_patch7_28"
TEACHER = "resnet10t"


def tiny_config(output_dir: Path | None, **overrides) -> TrainConfig:
    values = {
        "model.name": STUDENT,
        "data.dataset": "fashion-mnist",
        "data.train_subset": 512,
        "optim.epochs": 2,
        "optim.batch_size": 64,
        "optim.warmup_epochs": 1,
        "run.progress": False,
        "run.output_dir": None if output_dir is None else str(output_dir),
    }
    values.update(overrides)
    return with_overrides(TrainConfig(), values)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One two-epoch run shared by the tests below; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("run") / "student"
    config = tiny_config(out)
    return config, fit(config), out


def copy_run(first_run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(first_run[2], tmp_path / "copy"))


def test_fit_writes_config_metrics_and_checkpoints(first_run):
    config, result, out = first_run
    files = ["best.pth", "checkpoint.pth", "config.yaml", "metrics.jsonl", "steps.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert load_config(out / "config.yaml") == config

    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(16)) and [s["epoch"] for s in steps] == [1] * 8 + [2] * 8
    for record in records:
        assert record["train"]["steps"] == 8  # 512 images in batches of 64
        assert record["val"]["num_samples"] == 10000
        assert {"acc1", "acc5", "cls_acc1", "dist_acc1", "avg_logits_acc1", "softmax_sum_acc1"} <= set(record["val"])
    assert result.final == records[-1]["val"]
    assert result.best_acc1 == max(r["val"]["acc1"] for r in records)
    assert result.teacher is None
    assert result.final["acc1"] > 10  # better than chance on 10 classes, even after 16 steps


def test_checkpoint_is_weights_only_and_rebuilds_the_model(first_run):
    _, result, out = first_run
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["format"] == FORMAT and state["epoch"] == 2
    assert state["model_spec"]["name"] == STUDENT
    assert state["model_spec"]["num_classes"] == 10 and state["model_spec"]["in_chans"] == 1
    assert state["data"]["class_names"][0] == "T-shirt/top" and state["data"]["input_size"] == 28
    assert len(state["history"]) == 2
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["best_acc1"] == result.best_acc1

    rebuilt = model_from_checkpoint(load_checkpoint(out / "checkpoint.pth"))
    for (name, a), (_, b) in zip(result.model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b), name


# the keys every checkpoint has had on disk since format version 1 (Checkpoint reads and writes this layout)
VERSION_1_KEYS = {
    "format", "version", "model", "model_spec", "data", "model_ema", "optimizer", "scaler", "epoch", "epoch_step",
    "meters", "world_size", "best_acc1", "history", "config", "teacher_cache",
}  # fmt: skip


def test_checkpoints_keep_the_version_1_layout_and_older_files_still_resume(first_run, tmp_path):
    config, result, out = first_run
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert set(state) == VERSION_1_KEYS and state["version"] == 1
    saved = Checkpoint.load(out / "checkpoint.pth")
    assert saved.resumable and saved.epoch == 2 and saved.model_spec.name == STUDENT
    assert saved.data.class_names[0] == "T-shirt/top" and saved.history == result.history
    # files written before mid-epoch resume and torchrun lack the keys these added: the run continues
    older = {key: value for key, value in state.items() if key not in ("epoch_step", "meters", "world_size")}
    del older["teacher_cache"]
    (tmp_path / "older").mkdir()
    torch.save(older, tmp_path / "older" / "checkpoint.pth")
    shutil.copy(out / "steps.jsonl", tmp_path / "older")
    shutil.copy(out / "metrics.jsonl", tmp_path / "older")
    resumed = fit(tiny_config(tmp_path / "older", **{"optim.epochs": 3, "run.resume": "auto"}))
    assert [record["epoch"] for record in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == result.history


def test_second_run_in_the_same_folder_is_refused(first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    before = (out / "checkpoint.pth").read_bytes()
    metrics_before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match="resume"):
        fit(tiny_config(out))
    assert (out / "checkpoint.pth").read_bytes() == before
    assert (out / "metrics.jsonl").read_text() == metrics_before


def test_resume_auto_continues_at_the_next_epoch(first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    first_lines = (out / "metrics.jsonl").read_text().splitlines()
    result = fit(tiny_config(out, **{"optim.epochs": 3, "run.resume": "auto"}))

    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]  # only epoch 3 was trained
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == first_lines
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.final == records[-1]["val"]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 3
    assert load_config(out / "config.yaml").optim.epochs == 3


def test_resume_from_another_model_is_refused(first_run, tmp_path):
    checkpoint = first_run[2] / "checkpoint.pth"
    config = tiny_config(tmp_path / "other", **{"model.name": "deit_pico_patch7_28", "run.resume": str(checkpoint)})
    with pytest.raises(CheckpointError, match="another model"):
        fit(config)
    assert not (tmp_path / "other" / "checkpoint.pth").exists()


def test_resume_from_an_official_weights_file_starts_from_its_weights(first_run, tmp_path, monkeypatch):
    """--resume with an official {'model': ...} file, as the official code: weights in, epoch 0, fresh optimizer."""
    trained = load_checkpoint(first_run[2] / "checkpoint.pth")["model"]
    official = tmp_path / "official.pth"
    torch.save({"model": trained}, official)
    loaded = {}
    real_train = deit.training.train_steps

    def spy(parts, *args, **kwargs):  # the weights the first step starts from
        loaded.update({key: value.clone() for key, value in parts.model.state_dict().items()})
        return real_train(parts, *args, **kwargs)

    monkeypatch.setattr(deit.training, "train_steps", spy)
    result = fit(tiny_config(tmp_path / "resumed", **{"optim.epochs": 1, "run.resume": str(official)}))
    assert [r["epoch"] for r in result.history] == [1]
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)


def test_evaluate_checkpoint_matches_the_last_epoch(first_run):
    _, result, out = first_run
    metrics = evaluate_checkpoint(out / "checkpoint.pth", device="cpu", progress=False)
    last = read_metrics(out)[-1]["val"]
    assert metrics["num_samples"] == 10000
    assert metrics["acc1"] == pytest.approx(last["acc1"], abs=1e-9)
    assert metrics["cls_acc1"] == pytest.approx(last["cls_acc1"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(last["loss"], rel=1e-4)
    # another eval output: the prediction is then that head
    metrics = evaluate_checkpoint(out / "checkpoint.pth", device="cpu", eval_output="dist", progress=False)
    assert metrics["acc1"] == pytest.approx(last["dist_acc1"], abs=1e-9)


def test_hard_distillation_from_a_trained_cnn_teacher(tmp_path):
    teacher_run = fit(
        tiny_config(tmp_path / "teacher", **{"model.name": TEACHER, "model.drop_path": 0.0, "optim.epochs": 1})
    )
    teacher_checkpoint = tmp_path / "teacher" / "checkpoint.pth"
    assert load_checkpoint(teacher_checkpoint)["model_spec"]["name"] == TEACHER

    result = fit(
        tiny_config(
            tmp_path / "student",
            **{"optim.epochs": 1, "distill.type": "hard", "distill.teacher_path": str(teacher_checkpoint)},
        )
    )
    assert result.teacher is not None
    assert result.teacher["num_samples"] == 10000
    # the frozen teacher, evaluated on the same validation set, scores what it scored when it was trained
    assert result.teacher["acc1"] == pytest.approx(teacher_run.final["acc1"], abs=0.02)
    record = read_metrics(tmp_path / "student")[0]
    assert record["teacher"] == result.teacher
    assert record["train"]["distill_loss"] > 0
    assert record["train"]["loss"] == pytest.approx(
        0.5 * record["train"]["label_loss"] + 0.5 * record["train"]["distill_loss"], rel=1e-5
    )


def test_tensorboard_logs_every_step_and_each_epochs_metrics(tmp_path):
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    fit(tiny_config(None, **{"optim.epochs": 1, "run.tensorboard": str(tmp_path / "tb")}))
    events = accumulator_module.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "train/loss", "val/acc1", "val/cls_acc1", "val/dist_acc1"} <= tags
    assert [event.step for event in events.Scalars("step/loss")] == list(range(8))


def test_eval_interval_evaluates_every_nth_epoch_and_the_last(tmp_path):
    result = fit(tiny_config(tmp_path / "run", **{"optim.epochs": 3, "run.eval_interval": 2}))
    records = read_metrics(tmp_path / "run")
    assert [("val" in record) for record in records] == [False, True, True]
    assert result.final == records[-1]["val"] and result.best_acc1 == max(r["val"]["acc1"] for r in records[1:])
    figure_path = figures.save(figures.curves_figure({"run": records}), tmp_path / "curves.png")
    assert figure_path.stat().st_size > 0


def test_a_small_image_resnet_is_rebuilt_from_its_checkpoint_by_name(tmp_path):
    overrides = {
        "model.name": "resnet8_small",
        "model.drop_path": 0.0,
        "optim.epochs": 1,
        "augment.random_erasing": 0.25,
    }
    result = fit(tiny_config(tmp_path / "teacher", **overrides))
    state = load_checkpoint(tmp_path / "teacher" / "checkpoint.pth")
    rebuilt = model_from_checkpoint(state).eval()
    images = torch.randn(4, 1, 28, 28)
    assert torch.equal(rebuilt(images), result.model.eval()(images))  # what a student's teacher_path loads


def test_the_demo_prints_the_table_of_a_teacher_and_three_students(tmp_path):
    """The demo's steps on a tiny budget: teacher, the three students, the table with the distilled student's gain."""
    from deit.demo import DemoSettings, run_demo

    settings = DemoSettings(output_dir=str(tmp_path), epochs=1, teacher_epochs=1, train_subset=256, progress=False)
    report = run_demo(settings)
    assert [row["teacher"] for row in report.rows] == ["n/a", "none", "soft", "hard"]
    assert report.rows[-1]["cls_acc1"] is not None and report.rows[1]["cls_acc1"] is None  # one head without token
    assert "Class + distillation tokens against no distillation" in report.markdown
    assert "256 training images" in report.markdown and "RandAugment rand-m9-mstd0.5-inc1" in report.markdown
    saved = json.loads(report.json_path.read_text())
    assert "--config fashion_mnist_data_limited --model deit_nano_patch7_28" in saved["rows"][1]["command"]
    again = run_demo(settings)  # every run is there: read back, not retrained
    assert [row["acc1"] for row in again.rows] == [row["acc1"] for row in report.rows]


@pytest.mark.parametrize(("amp", "kernel", "other"), [("bf16", "math", "sdpa"), ("none", "sdpa", "math")])
def test_auto_attention_is_explicit_under_bf16_on_cpu_and_the_model_spec_records_the_kernel(amp, kernel, other):
    run = build_run(tiny_config(None, **{"run.amp": amp, "run.device": "cpu"}))
    assert run.spec.options["attn_impl"] == kernel  # the spec is what checkpoints store
    assert {block.attn.impl for block in run.model.blocks} == {kernel}
    named = build_run(tiny_config(None, **{"run.amp": amp, "run.device": "cpu", "model.attn_impl": other}))
    assert named.model.blocks[0].attn.impl == other  # a kernel named in the config is kept
    assert attention_kernel("auto", Precision("cuda", torch.bfloat16)) == "sdpa"


def test_evaluation_on_cpu_of_a_gpu_fp16_run_uses_this_machines_precision(first_run, tmp_path, monkeypatch):
    folder = copy_run(first_run, tmp_path)
    state = torch.load(folder / "checkpoint.pth", weights_only=True)
    state["config"]["run"]["amp"] = "fp16"  # as a CUDA run would have written it
    torch.save(state, folder / "checkpoint.pth")
    resolved = []
    monkeypatch.setattr(deit.evaluation.Precision, "resolve", lambda amp, device: resolved.append(amp) or None)
    monkeypatch.setattr(deit.evaluation, "evaluate", lambda *args, **kwargs: {})
    evaluate_checkpoint(folder / "checkpoint.pth", device="cpu", progress=False)
    evaluate_checkpoint(folder / "checkpoint.pth", device="cpu", amp="none", progress=False)
    assert resolved == ["auto", "none"]  # not CPU fp16 autocast; a precision asked for is kept


def test_a_checkpoint_records_the_resolved_kernel_and_auto_resumes_it(first_run, tmp_path):
    folder = copy_run(first_run, tmp_path)
    # the default precision is auto: bf16 on a CPU that computes it natively (then explicit attention), else fp32
    resolved = attention_kernel("auto", Precision.resolve("auto", torch.device("cpu")))
    other = {"sdpa": "math", "math": "sdpa"}[resolved]
    assert Checkpoint.load(folder / "checkpoint.pth").model_spec.options["attn_impl"] == resolved  # not "auto"
    named = tiny_config(folder, **{"model.attn_impl": resolved, "optim.epochs": 3, "run.resume": "auto"})
    assert fit(named).history[-1]["epoch"] == 3  # the config names what "auto" resolved to: the same run
    changed = tiny_config(folder, **{"model.attn_impl": other, "optim.epochs": 4, "run.resume": "auto"})
    with pytest.raises(CheckpointError, match=f"attention kernel: '{resolved}' -> '{other}'"):
        fit(changed)
