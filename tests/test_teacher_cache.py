"""The teacher cache: the teacher runs once per (image, view), its logits are exact, and runs resume exactly."""

from __future__ import annotations

import signal

import pytest
import timm
import torch

import deit.teacher_cache
import deit.training
from conftest import needs_fashion_mnist
from deit.checkpoint import load_checkpoint
from deit.config import TrainConfig, with_overrides
from deit.interrupts import StopRequest
from deit.run import RunError, build_run
from deit.training import RunInterrupted, fit

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict(), path)
    return path


def cached_config(teacher_file, out, **overrides) -> TrainConfig:
    values = {
        "model.name": "deit_pico_distilled_patch7_28",
        "data.train_subset": 256,
        "optim.epochs": 4,
        "optim.batch_size": 64,
        "optim.warmup_epochs": 1,
        "distill.type": "hard",
        "distill.teacher_model": "resnet10t",
        "distill.teacher_path": str(teacher_file),
        "distill.teacher_cache_views": 2,
        "run.progress": False,
        "run.eval_teacher": False,
        "run.output_dir": None if out is None else str(out),
    }
    return with_overrides(TrainConfig(), {**values, **overrides})


def test_the_teacher_runs_only_in_the_first_epochs_and_its_logits_are_exact(teacher_file, monkeypatch):
    calls_per_epoch = []
    real_set_epoch = deit.teacher_cache.TeacherCache.set_epoch

    def counting(self, epoch):
        calls_per_epoch.append(self.calls)
        real_set_epoch(self, epoch)

    monkeypatch.setattr(deit.teacher_cache.TeacherCache, "set_epoch", counting)
    config = cached_config(teacher_file, None)
    fit(config)
    assert calls_per_epoch == [0, 4, 8, 8]  # 4 batches per epoch; views 0 and 1 filled, then only reused

    run = build_run(config)  # the same data and views: recompute view 1 of a few images with the bare teacher
    run.data.train_sampler.set_epoch(1)
    images, _, indices, seeds = next(iter(run.data.train_loader))
    cache = run.teacher
    cache.set_epoch(1)
    with torch.no_grad():
        direct = cache.teacher(run.data.batch_transform(images, seeds))
    assert torch.equal(cache(run.data.batch_transform(images, seeds), indices), direct)  # filled now, as in training


def test_resume_with_a_cache_is_bit_identical(teacher_file, tmp_path, monkeypatch):
    whole = fit(cached_config(teacher_file, tmp_path / "whole"))
    stop = StopRequest()
    real_step = deit.training.RunLogs.step

    def stop_at_step_9(self, record):  # in the third epoch, when both views are cached
        real_step(self, record)
        if record["step"] == 9:
            stop.request(signal.SIGTERM)

    monkeypatch.setattr(deit.training.RunLogs, "step", stop_at_step_9)
    with pytest.raises(RunInterrupted):
        fit(cached_config(teacher_file, tmp_path / "resumed"), stop=stop)
    monkeypatch.setattr(deit.training.RunLogs, "step", real_step)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")["teacher_cache"]["filled"].all()
    resumed = fit(cached_config(teacher_file, tmp_path / "resumed", **{"run.resume": "auto"}))
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"augment.mixup": 0.8}, "Mixup"),
        ({"augment.repeated_aug": 3}, "repeated"),
        ({"augment.batched": False}, "in-memory"),
    ],
)
def test_the_cache_refuses_recipes_it_cannot_serve(teacher_file, overrides, reason):
    with pytest.raises(RunError, match=reason):
        build_run(cached_config(teacher_file, None, **overrides))


def test_the_cache_serves_the_papers_augmentations(teacher_file):
    """RandAugment and Random Erasing are drawn from each view's seed: a view is fixed, its teacher logits cacheable."""
    paper = {"augment.random_erasing": 0.25, "augment.rand_augment": "rand-m9-mstd0.5-inc1"}
    run = build_run(cached_config(teacher_file, None, **paper))
    assert isinstance(run.teacher, deit.teacher_cache.TeacherCache)
    assert run.data.batch_transform.random_erasing == 0.25 and run.data.batch_transform.rand_augment is not None


def test_compiled_student_and_channels_last_teacher_train_as_the_plain_ones(teacher_file):
    """torch.compile (its eager backend here, to stay fast) and a channels-last teacher change no result."""
    plain_levers = {"optim.epochs": 1, "distill.teacher_cache_views": None, "distill.teacher_channels_last": False}
    plain = fit(cached_config(teacher_file, None, **plain_levers))
    levers = {"optim.epochs": 1, "distill.teacher_cache_views": None, "run.compile": "eager"}
    fast = fit(cached_config(teacher_file, None, **levers, **{"distill.teacher_channels_last": True}))
    assert fast.history[0]["train"]["loss"] == pytest.approx(plain.history[0]["train"]["loss"], rel=1e-5)
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(value, fast.model.state_dict()[name], atol=1e-5), name


def test_a_teacher_compiled_with_freezing_gives_the_eager_teachers_logits(teacher_file):
    """--compile with inductor folds the frozen teacher's weights in as constants; its answers must not change."""
    online = {"distill.teacher_cache_views": None, "run.amp": "none"}  # fp32: the two can agree to 1e-4
    eager = build_run(cached_config(teacher_file, None, **online))
    compiled = build_run(cached_config(teacher_file, None, **online, **{"run.compile": "inductor"}))
    images = torch.randn(8, 1, 28, 28)
    assert torch.allclose(compiled.teacher(images), eager.teacher(images), atol=1e-4)
