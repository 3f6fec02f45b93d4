"""The paper's recipe, piece by piece: each component must act, and the presets must load and build."""

from __future__ import annotations

import dataclasses
import math

import PIL
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import needs_fashion_mnist
from deit.config import PRESETS_DIR, TrainConfig, list_presets, load_config, with_overrides
from deit.data import Batch, build_data
from deit.data.augment import build_mixup, rand_augment, random_erasing
from deit.data.samplers import EpochSampler
from deit.ema import ModelEma
from deit.engine import Precision, StepParts, train_steps
from deit.evaluation import evaluate_checkpoint
from deit.losses import DistillationLoss
from deit.models import create_model, is_deit_model
from deit.training import fit, model_options

PAPER_POLICY = "rand-m9-mstd0.5-inc1"


# --- Mixup / CutMix ------------------------------------------------------------------------------


def test_mixup_cutmix_give_soft_targets_that_sum_to_one():
    mix = build_mixup(mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=10)
    torch.manual_seed(0)
    images = torch.randn(8, 1, 28, 28)
    labels = torch.arange(8)
    mixed, targets = mix(images.clone(), labels)
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    # sample i is mixed with sample 7 - i: both labels carry weight, and the images changed
    assert (targets[0, 0] > 0) and (targets[0, 7] > 0)
    assert not torch.equal(mixed, images)


def test_mixing_off_builds_nothing():
    assert build_mixup(mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=10) is None


# --- RandAugment with the Pillow 13 posterize guard ----------------------------------------------


@pytest.mark.skipif(tuple(int(v) for v in PIL.__version__.split(".")[:1]) < (13,), reason="Pillow < 13 accepts 0 bits")
def test_timm_posterize_at_zero_bits_fails_on_this_pillow():
    """Why the guard exists: the op timm's increasing posterize reaches at magnitude 10."""
    from timm.data.auto_augment import posterize

    with pytest.raises(ValueError, match="bits"):
        posterize(Image.new("RGB", (8, 8), (200, 100, 50)), 0)


def test_guarded_posterize_keeps_zero_bits_as_black():
    transform = rand_augment(PAPER_POLICY, input_size=32, mean=(0.5, 0.5, 0.5))
    [op] = [op for op in transform.ops if op.name == "PosterizeIncreasing"]
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.aug_fn(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert op.aug_fn(image, 8) is image  # 8 bits: unchanged, as timm does


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_paper_rand_augment_survives_thousands_of_images(mode):
    """The unguarded policy fails about once in 1,000-1,300 images on Pillow 13; draw 4,000."""
    import random

    random.seed(0)
    import numpy as np

    np.random.seed(0)
    mean = (0.5, 0.5, 0.5) if mode == "RGB" else (0.5,)
    transform = rand_augment(PAPER_POLICY, input_size=16, mean=mean)
    image = Image.fromarray(np.random.randint(0, 256, (16, 16, 3) if mode == "RGB" else (16, 16), dtype=np.uint8))
    for _ in range(4000):
        out = transform(image)
        assert out.size == (16, 16) and out.mode == mode


# --- Random Erasing ------------------------------------------------------------------------------


def test_random_erasing_replaces_one_box():
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    erased = random_erasing(1.0)(image.clone())
    changed = (erased != 0).any(dim=0)  # (H, W)
    assert 0 < changed.sum() < 32 * 32
    rows, cols = changed.nonzero(as_tuple=True)
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all()  # one filled rectangle
    assert torch.equal(random_erasing(0.0)(image.clone()), image)


# --- repeated augmentation -----------------------------------------------------------------------


def indices(sampler: EpochSampler) -> list[int]:
    return [index for index, _ in sampler]


def test_repeated_augmentation_yields_each_index_three_times_per_epoch():
    sampler = EpochSampler(100, repeats=3, seed=1)
    drawn = list(sampler)
    order = [index for index, _ in drawn]
    assert len(order) == len(sampler) == 99  # the data set's length, cut to whole groups of 3
    counts = torch.bincount(torch.tensor(order), minlength=100)
    assert set(counts.tolist()) == {0, 3}
    assert order[0] == order[1] == order[2]  # on one process the copies share a batch
    assert len({seed for _, seed in drawn}) == 99  # each copy has its own augmentation seed
    assert list(sampler) == drawn  # same epoch, same order and seeds
    sampler.set_epoch(1)
    assert indices(sampler) != order


@pytest.mark.parametrize("world", [2, 3, 4])
def test_repeated_augmentation_across_processes(world):
    ranks = [EpochSampler(1000, repeats=3, num_replicas=world, rank=r, seed=5) for r in range(world)]
    per_rank = [indices(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1  # every rank the same length: no rank waits at a barrier
    counts = torch.bincount(torch.tensor(sum(per_rank, [])), minlength=1000)
    assert set(counts.tolist()) <= {0, 3}
    assert counts.sum() == len(ranks[0]) * world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_processes_share_one_global_order_with_the_same_seeds(world):
    """The union of the processes' i-th batches is the one process's i-th global batch, seeds included."""
    single = list(EpochSampler(120, seed=7))
    shards = [list(EpochSampler(120, num_replicas=world, rank=r, seed=7)) for r in range(world)]
    merged = [shards[position % world][position // world] for position in range(len(shards[0]) * world)]
    assert len(merged) == len(single) == 120  # 120 splits evenly over 1, 2 and 3 processes: nothing dropped
    assert merged == single


def test_resuming_inside_an_epoch_skips_exactly_the_samples_seen():
    sampler = EpochSampler(90, repeats=3, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=10)
    assert list(sampler) == whole[10:]


def test_weighted_draws_give_each_group_its_share_and_repeat_across_processes_and_resumes():
    # 10 images in one group, 90 in another, each group weighted to half of the draws (DeepCluster's clusters)
    weights = torch.cat([torch.full((10,), 1 / 10), torch.full((90,), 1 / 90)])
    sampler = EpochSampler(100, seed=3)
    sampler.draw_by(weights)
    sampler.set_epoch(2)
    drawn = list(sampler)
    order = torch.tensor([index for index, _ in drawn])
    assert len(order) == 100 and 35 <= int((order < 10).sum()) <= 65  # half, where a plain epoch draws 10
    assert len(order.unique()) < 100  # with replacement
    assert list(sampler) == drawn  # the draw is the seed's, the epoch's and the weights'
    shards = [EpochSampler(100, num_replicas=2, rank=rank, seed=3) for rank in range(2)]
    for shard in shards:
        shard.draw_by(weights)
        shard.set_epoch(2)
    assert [item for pair in zip(*shards, strict=True) for item in pair] == drawn
    sampler.set_epoch(2, start=40)
    assert list(sampler) == drawn[40:]
    sampler.draw_by(None)
    sampler.set_epoch(2)
    assert sorted(index for index, _ in sampler) == list(range(100))  # back to every image once


@pytest.mark.parametrize("weights", [torch.ones(99), -torch.ones(100), torch.zeros(100)])
def test_weights_that_cannot_draw_an_epoch_are_refused(weights):
    with pytest.raises(ValueError, match="weights must"):
        EpochSampler(100).draw_by(weights)


@needs_fashion_mnist
def test_repeated_copies_are_augmented_differently():
    data = build_data(
        "fashion-mnist", None, batch_size=48, seed=0, train_subset=480, repeated_aug=3, rand_augment=PAPER_POLICY
    )
    batch = next(iter(data.train_loader))
    assert data.batch_transform is not None  # in memory: the copies are augmented whole-batch, each by its own seed
    images, labels = data.batch_transform(batch.images, batch.seeds), batch.labels
    triples = images.view(16, 3, -1)
    assert torch.equal(labels.view(16, 3), labels.view(16, 3)[:, :1].expand(16, 3))  # copies of one image
    differing = sum(not torch.equal(t[0], t[1]) and not torch.equal(t[1], t[2]) for t in triples)
    assert differing >= 14


# --- EMA -----------------------------------------------------------------------------------------


def test_ema_follows_the_formula_and_differs_from_live_weights():
    model = nn.Linear(4, 2)
    ema = ModelEma(model, decay=0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)
    assert not torch.equal(ema.module.weight, model.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


# --- gradient accumulation -----------------------------------------------------------------------


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    results = []
    for batch, accum in ((16, 1), (8, 2), (4, 4)):
        torch.manual_seed(1)
        model = create_model("deit_pico_patch7_28", 10, in_chans=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = [Batch(images[i : i + batch], labels[i : i + batch], torch.arange(batch)) for i in range(0, 16, batch)]
        cpu = torch.device("cpu")
        parts = StepParts(model, DistillationLoss(), optimizer, lambda step: 0.1, cpu, Precision.resolve("none", cpu),
                          accum_steps=accum)  # fmt: skip
        assert len(list(train_steps(parts, loader, first_step=0, steps=1))) == 1
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=1e-4)


# --- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_builds(preset, fast_init):
    config = load_config(preset)
    assert config == load_config(PRESETS_DIR / f"{preset}.yaml")
    num_classes = {"cifar100": 100, "imagefolder": 1000}.get(config.data.dataset, 10)
    kwargs = {"in_chans": 1} if config.data.dataset == "fashion-mnist" else {}
    if is_deit_model(config.model.name):
        kwargs["img_size"] = config.data.input_size
    model = create_model(config.model.name, num_classes, **kwargs, **model_options(config.model))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_paper_presets_hold_table_9():
    config = load_config("deit_small_distilled_imagenet")
    assert config.optim.batch_size * config.optim.accum_steps == 1024
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_epochs, config.optim.epochs) == (
        5e-4, 0.05, 5, 300,
    )  # fmt: skip
    augment = config.augment
    assert (augment.rand_augment, augment.random_erasing, augment.mixup, augment.cutmix) == (
        PAPER_POLICY,
        0.25,
        0.8,
        1.0,
    )
    assert (augment.mix_switch_prob, augment.repeated_aug, config.optim.label_smoothing) == (0.5, 3, 0.1)
    assert (config.model.drop_path, config.model.dropout, config.distill.type) == (0.1, 0.0, "hard")
    assert config.model.name == "deit_small_distilled_patch16_224"


def test_a_preset_may_extend_another(tmp_path):
    (tmp_path / "parent.yaml").write_text("optim:\n  epochs: 7\n  lr: 0.001\n")
    (tmp_path / "child.yaml").write_text("base: parent\noptim:\n  epochs: 9\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.optim.epochs, config.optim.lr) == (9, 0.001)


# --- the whole recipe in one run -----------------------------------------------------------------


@needs_fashion_mnist
def test_full_recipe_trains_with_distillation_and_ema(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    common = {
        "data.train_subset": 384, "optim.batch_size": 32, "optim.warmup_epochs": 0,
        "run.progress": False, "run.eval_teacher": False,
    }  # fmt: skip
    fit(
        with_overrides(
            TrainConfig(), {**common, "model.name": "resnet10t", "optim.epochs": 1, "run.output_dir": str(teacher_dir)}
        )
    )
    recipe = {
        "model.name": "deit_pico_distilled_patch7_28", "model.drop_path": 0.1, "optim.epochs": 2,
        "augment.rand_augment": PAPER_POLICY, "augment.random_erasing": 0.25, "augment.mixup": 0.8,
        "augment.cutmix": 1.0, "augment.repeated_aug": 3, "optim.accum_steps": 2, "optim.ema_decay": 0.9,
        "optim.clip_grad": 1.0, "distill.type": "hard", "distill.teacher_path": str(teacher_dir / "checkpoint.pth"),
        "run.output_dir": str(student_dir),
    }  # fmt: skip
    result = fit(with_overrides(TrainConfig(), {**common, **recipe}))
    last = result.history[-1]
    assert last["train"]["steps"] == 384 // 32 // 2
    assert "val_ema" in last and "distill_loss" in last["train"]
    state = torch.load(student_dir / "checkpoint.pth", weights_only=True)
    assert any(not torch.equal(state["model_ema"][k], state["model"][k]) for k in state["model"])
    ema_metrics = evaluate_checkpoint(student_dir / "checkpoint.pth", use_ema=True, progress=False)
    assert ema_metrics["acc1"] == pytest.approx(last["val_ema"]["acc1"])
    assert dataclasses.asdict(result.model.config)["drop_path_rate"] == 0.1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_steps(amp):
    """bf16 and fp16 autocast (fp16 with a gradient scaler) train on this device and change the weights."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = create_model("deit_pico_distilled_patch7_28", 10, in_chans=1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    loader = [Batch(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8)) for _ in range(3)]
    precision = Precision.resolve(amp, device)
    assert precision.describe() == f"{'bfloat16' if amp == 'bf16' else 'float16'} autocast on cpu"
    parts = StepParts(model, DistillationLoss(), optimizer, lambda step: 1e-3, device, precision, scaler=scaler)
    records = list(train_steps(parts, loader, first_step=0, steps=3))
    assert len(records) == 3 and all(math.isfinite(record.loss) and not record.nonfinite for record in records)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True) if p.requires_grad)
