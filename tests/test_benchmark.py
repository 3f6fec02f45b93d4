"""deit benchmark: sane figures, a real training step, the teacher's share, one row per model and dtype."""

from __future__ import annotations

import json

import pytest
import torch

import deit.benchmark
from deit.benchmark import BenchmarkError, measure_throughput
from deit.cli import main
from deit.models import create_model

FAST = {"warmup": 1, "iters": 1, "repeats": 1}


def test_inference_figures_are_sane():
    result = measure_throughput("deit_pico_distilled_patch4_28", batch_size=4, input_size=28, in_chans=1, **FAST)
    model = create_model("deit_pico_distilled_patch4_28", num_classes=1000, in_chans=1)
    assert result.params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert result.images_per_sec > 0 and result.peak_memory_mb > 0
    assert (result.mode, result.resolution, result.batch, result.teacher_share) == ("inference", 28, 4, None)


def test_a_training_step_updates_the_weights_and_the_teacher_share_is_reported(monkeypatch):
    changed = []
    real_step = deit.benchmark._train_step

    def spying_step(model, *args):
        step = real_step(model, *args)
        before = [p.detach().clone() for p in model.parameters()]

        def run():
            step()
            changed.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)))

        return run

    monkeypatch.setattr(deit.benchmark, "_train_step", spying_step)
    result = measure_throughput(
        "deit_pico_distilled_patch4_28", batch_size=4, input_size=28, num_classes=10, train=True, teacher="resnet10t",
        **FAST,
    )  # fmt: skip
    assert changed and all(changed)
    assert result.mode == "train + teacher resnet10t"


def test_the_teacher_share_is_the_part_of_a_step_the_teacher_adds(monkeypatch):
    timings = iter([3.0, 4.0])  # the student's step alone, then with the teacher: a quarter is the teacher's
    monkeypatch.setattr(deit.benchmark, "_timed", lambda *args: next(timings))
    result = measure_throughput(
        "deit_pico_distilled_patch4_28", batch_size=4, input_size=28, num_classes=10, train=True, teacher="resnet10t",
        **FAST,
    )  # fmt: skip
    assert result.teacher_share == pytest.approx(0.25)


def test_cli_prints_one_row_per_model_and_dtype(capsys):
    args = ["benchmark", "--model", "deit_pico_patch4_28", "resnet10t", "--dtype", "fp32", "bf16"]
    args += ["--batch-size", "2", "--input-size", "28", "--iters", "1", "--repeats", "1", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["dtype"]) for r in rows] == [
        ("deit_pico_patch4_28", "fp32"), ("deit_pico_patch4_28", "bf16"), ("resnet10t", "fp32"), ("resnet10t", "bf16"),
    ]  # fmt: skip


def test_bad_requests_are_clear_errors(capsys):
    with pytest.raises(BenchmarkError, match="fp16"):
        measure_throughput("resnet10t", batch_size=2, input_size=28, dtype="fp16", device="cpu", **FAST)
    assert main(["benchmark", "--model", "no_such_model", "--batch-size", "2"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["benchmark", "--model", "resnet10t", "--teacher", "resnet18"]) == 2
    assert "--train" in capsys.readouterr().err


def test_the_share_of_the_matmul_peak_counts_a_training_step_as_about_three_forwards(monkeypatch):
    monkeypatch.setattr(deit.benchmark, "_timed", lambda *args, **kwargs: 0.5)  # seconds per step, and per matmul
    model = {"batch_size": 8, "input_size": 28, "in_chans": 1, "num_classes": 10, "peak": True, **FAST}
    inference = measure_throughput("deit_pico_patch4_28", **model)
    training = measure_throughput("deit_pico_patch4_28", train=True, attn_impl="math", **model)
    assert 2.5 < training.gflop_per_image / inference.gflop_per_image < 3.5  # forward + backward ~ 3 forwards
    peak = 2 * 2048**3 / 0.5 / 1e9  # what the patched timer makes of the 2048² matmul
    assert training.peak_share == pytest.approx(training.gflop_per_image * 8 / 0.5 / peak)
    assert (inference.attention, training.attention) == ("sdpa", "math")
    assert measure_throughput("deit_pico_patch4_28", dtype="bf16", **model).attention == "math"  # train's auto
    assert measure_throughput("resnet10t", **model).attention is None
