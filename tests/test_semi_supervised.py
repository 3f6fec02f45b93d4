"""Unlabelled images: the stratified label split, mixed batches, the masked loss, pseudo-labels, Noisy Student."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import needs_fashion_mnist, write_image
from deit.cli import main
from deit.config import TrainConfig, with_overrides
from deit.data import DataError, Unlabeled, build_data
from deit.data.samplers import MixedEpochSampler
from deit.data.unlabeled import UNLABELED, label_fraction_mask
from deit.losses import DistillationLoss, soft_distillation_loss
from deit.noisy_student import NoisyStudentPlan, run_noisy_student
from deit.pseudo_labels import PseudoLabelError, PseudoLabels, PseudoLabelTeacher, select
from deit.run import RunError, build_run
from deit.training import fit

# --- the label split ------------------------------------------------------------------------------


def test_label_fraction_is_stratified_seeded_and_nested():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    tenth = label_fraction_mask(labels, 0.1, seed=3)
    assert torch.equal(tenth, label_fraction_mask(labels, 0.1, seed=3))  # same seed, same split
    assert not torch.equal(tenth, label_fraction_mask(labels, 0.1, seed=4))
    assert torch.bincount(labels[tenth]).tolist() == [10] * 10  # every class keeps a tenth
    hundredth = label_fraction_mask(labels, 0.01, seed=3)
    assert torch.bincount(labels[hundredth]).tolist() == [1] * 10
    assert not (hundredth & ~tenth).any()  # the 1 % labels are among the 10 % ones
    uneven = torch.tensor([0] * 7 + [1] * 50)
    assert torch.bincount(uneven[label_fraction_mask(uneven, 0.1, seed=0)]).tolist() == [1, 5]  # at least one
    with pytest.raises(DataError, match="label-fraction"):
        label_fraction_mask(labels, 0.0, seed=0)


# --- batches of a set unlabelled share ------------------------------------------------------------


def test_mixed_batches_hold_the_set_share_and_cycle_the_labelled_images():
    labels = torch.tensor([3] * 40 + [UNLABELED] * 160)
    sampler = MixedEpochSampler(labels, batch_size=10, unlabeled_ratio=0.7, seed=0)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 200  # an epoch spans the whole pool
    indices = torch.tensor([index for index, _ in keys]).view(20, 10)
    assert ((indices < 40).sum(dim=1) == 3).all()  # 3 labelled, 7 unlabelled in every batch
    labelled_draws = indices[indices < 40]
    assert sorted(labelled_draws[:40].tolist()) == list(range(40))  # each labelled image once before any repeat
    unlabelled_draws = indices[indices >= 40].tolist()
    assert len(set(unlabelled_draws)) == len(unlabelled_draws) == 140  # 140 of the 160, none twice
    assert keys == list(sampler)  # an epoch is drawn the same way again
    sampler.set_epoch(1)
    assert list(sampler) != keys


def test_mixed_batches_on_two_processes_deal_out_the_one_process_batches():
    labels = torch.tensor([0, 1] * 30 + [UNLABELED] * 140)
    single = list(MixedEpochSampler(labels, batch_size=20, unlabeled_ratio=0.7, seed=1))
    ranks = [
        list(MixedEpochSampler(labels, batch_size=10, unlabeled_ratio=0.7, num_replicas=2, rank=rank, seed=1))
        for rank in (0, 1)
    ]
    for batch in range(len(single) // 20):
        shards = ranks[0][batch * 10 : (batch + 1) * 10] + ranks[1][batch * 10 : (batch + 1) * 10]
        assert sorted(shards) == sorted(single[batch * 20 : (batch + 1) * 20])  # same images, same seeds
    resumed = MixedEpochSampler(labels, batch_size=10, unlabeled_ratio=0.7, num_replicas=2, rank=1, seed=1)
    resumed.set_epoch(0, start=10)
    assert list(resumed) == ranks[1][10:]


def test_a_batch_without_labelled_images_is_refused():
    with pytest.raises(ValueError, match="no labelled image"):
        MixedEpochSampler(torch.tensor([0] + [UNLABELED] * 99), batch_size=4, unlabeled_ratio=0.9)


# --- the loss ------------------------------------------------------------------------------------


def test_unlabelled_images_train_only_the_distillation_head():
    cls_logits = torch.randn(6, 4, requires_grad=True)
    dist_logits = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 4)
    target = torch.tensor([1, 2, UNLABELED, UNLABELED, 3, UNLABELED])
    known = target >= 0
    parts = DistillationLoss("soft", alpha=0.5).components((cls_logits, dist_logits), target, teacher)
    assert parts["label_loss"].item() == pytest.approx(F.cross_entropy(cls_logits[known], target[known]).item())
    assert parts["distill_loss"].item() == pytest.approx(soft_distillation_loss(dist_logits, teacher, 1.0).item())
    parts["loss"].backward()
    assert (cls_logits.grad[~known] == 0).all() and (cls_logits.grad[known] != 0).any()
    assert (dist_logits.grad[~known] != 0).any()  # the teacher teaches on every image


# --- training pools ------------------------------------------------------------------------------


@needs_fashion_mnist
def test_label_fraction_hides_labels_and_mixes_every_batch():
    unlabeled = Unlabeled(label_fraction=0.1, ratio=0.6)
    data = build_data("fashion-mnist", None, batch_size=50, seed=0, train_subset=1000, unlabeled=unlabeled)
    full = build_data("fashion-mnist", None, batch_size=50, seed=0, train_subset=1000)
    pool, original = data.train_loader.dataset, full.train_loader.dataset
    assert torch.equal(pool.images, original.images)  # the same images, in the same order
    kept = pool.labels >= 0
    assert torch.equal(pool.labels[kept], original.labels[kept]) and (pool.labels[~kept] == UNLABELED).all()
    assert torch.bincount(pool.labels[kept]).tolist() == [10] * 10
    _, labels, indices, _ = next(iter(data.train_loader))
    assert (labels == UNLABELED).sum() == 30
    assert torch.equal(pool.labels[indices], labels)


def _unlabelled_folder(root: Path) -> Path:
    (root / "shop").mkdir(parents=True)
    write_image(root / "a.png", "RGB", "PNG", (40, 30), seed=1)
    write_image(root / "shop" / "b.jpg", "RGB", "JPEG", (28, 28), seed=2)
    write_image(root / "shop" / "c.png", "L", "PNG", (64, 90), seed=3)
    return root


@needs_fashion_mnist
def test_an_unlabelled_folder_joins_an_in_memory_set_at_its_size(tmp_path):
    folder = _unlabelled_folder(tmp_path / "unlabelled")
    unlabeled = Unlabeled(path=str(folder))
    data = build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=200, unlabeled=unlabeled)
    pool = data.train_loader.dataset
    assert len(pool) == 203 and pool.images.shape[1:] == (1, 28, 28)
    assert pool.labels[-3:].tolist() == [UNLABELED] * 3 and (pool.labels[:200] >= 0).all()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        build_data("fashion-mnist", None, batch_size=32, seed=0, train_subset=200, unlabeled=unlabeled)
    skipped = build_data(
        "fashion-mnist", None, batch_size=32, seed=0, train_subset=200, unlabeled=unlabeled, bad_files="skip"
    )
    assert len(skipped.train_loader.dataset) == 203


def test_an_unlabelled_folder_joins_an_image_folder_set(make_image_folder, tmp_path):
    root = make_image_folder(classes=("ant", "bee"), per_class={"train": 4, "val": 2})
    folder = _unlabelled_folder(tmp_path / "extra")
    unlabeled = Unlabeled(path=str(folder), ratio=0.5)
    data = build_data("imagefolder", str(root), batch_size=4, seed=0, input_size=32, unlabeled=unlabeled)
    images, labels, indices, seeds = next(iter(data.train_loader))  # per-image transforms: no seeds
    assert seeds is None
    assert images.shape == (4, 3, 32, 32)
    assert (labels == UNLABELED).sum() == 2
    assert [data.train_loader.dataset.dataset.targets[i] for i in indices.tolist()] == labels.tolist()
    with pytest.raises(DataError, match="does not exist"):
        build_data("imagefolder", str(root), batch_size=4, seed=0, input_size=32, unlabeled=Unlabeled(path="/nope"))


# --- pseudo-labels -------------------------------------------------------------------------------


def test_selection_thresholds_and_balances_only_the_unlabelled_images():
    probs = torch.tensor(
        [[0.2, 0.8, 0.0], [0.9, 0.1, 0.0]]  # labelled: always kept, whatever the teacher says
        + [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.4, 0.3, 0.3]]  # class 0, one unsure
        + [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]]  # one of class 1, one of class 2
    )
    labels = torch.tensor([1, 0] + [UNLABELED] * 6)
    assert select(probs, labels).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert select(probs, labels, threshold=0.5).tolist() == [0, 1, 2, 3, 4, 6, 7]
    balanced = select(probs, labels, threshold=0.5, balance=True, seed=0)  # 5 kept: 1 per class
    assert balanced.tolist() == [0, 1, 2, 6, 7]  # class 0 keeps its most confident image
    wide = torch.cat([probs, torch.tensor([[0.0, 0.1, 0.9]] * 4)])  # now 2 of class 2 ... 3 of class 0
    boosted = select(wide, torch.cat([labels, torch.full((4,), UNLABELED)]), balance=True, seed=0)
    counts = torch.bincount(wide[boosted[2:]].argmax(dim=-1), minlength=3)
    assert counts.tolist() == [3, 3, 3]  # class 1's single image repeated up to the mean count


def test_pseudo_labels_round_trip_and_are_looked_up_by_index(tmp_path):
    probs = torch.softmax(torch.randn(8, 3), dim=-1)
    labels = PseudoLabels(probs, torch.tensor([0, 1, 5, 5, 7]), ("a", "b", "c"), "teacher.pth", "f00d")
    labels.save(tmp_path / "p.safetensors")
    loaded = PseudoLabels.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.probs, probs) and loaded.selection.tolist() == [0, 1, 5, 5, 7]
    assert loaded.class_names == ("a", "b", "c") and loaded.pool == "f00d"
    teacher = PseudoLabelTeacher(loaded)
    out = teacher(torch.zeros(2, 1, 4, 4), torch.tensor([2, 4]))  # rows 2 and 4 of the selection: images 5 and 7
    assert torch.allclose(out.softmax(dim=-1), probs[[5, 7]], atol=1e-6)
    (tmp_path / "other.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PseudoLabelError, match="unreadable as safetensors"):
        PseudoLabels.load(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # safetensors, but not ours
    with pytest.raises(PseudoLabelError, match="deit pseudo-label"):
        PseudoLabels.load(tmp_path / "weights.safetensors")


# --- whole runs ----------------------------------------------------------------------------------

STUDENT = "deit_pico_distilled_patch7_28"


def tiny_config(output_dir: Path, **overrides) -> TrainConfig:
    values = {
        "model.name": STUDENT,
        "data.train_subset": 600,
        "data.label_fraction": 0.2,
        "optim.epochs": 1,
        "optim.batch_size": 50,
        "optim.warmup_epochs": 0.5,
        "run.progress": False,
        "run.output_dir": str(output_dir),
    }
    return with_overrides(TrainConfig(), values | overrides)


@needs_fashion_mnist
def test_without_a_teacher_only_labelled_images_are_drawn(tmp_path):
    run = build_run(tiny_config(tmp_path))
    assert run.data.train_sampler.per_batch_unlabeled == 0
    assert len(run.data.train_loader) == 12  # the epoch still spans the 600-image pool
    with pytest.raises(RunError, match="Mixup"):
        build_run(tiny_config(tmp_path, **{"augment.mixup": 0.8, "distill.type": "soft"}))
    with pytest.raises(RunError, match="distillation-type"):
        build_run(tiny_config(tmp_path, **{"distill.pseudo_labels": str(tmp_path / "p.safetensors")}))
    with pytest.raises(RunError, match="not both"):
        stored = {"distill.pseudo_labels": str(tmp_path / "p.safetensors"), "distill.type": "soft"}
        build_run(tiny_config(tmp_path, **stored, **{"distill.teacher_path": str(tmp_path / "t.pth")}))


def test_noisy_student_is_refused_under_torchrun_with_the_way_to_do_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunError, match="deit pseudo-label"):
        run_noisy_student(tiny_config(tmp_path), NoisyStudentPlan(generations=1), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written


@needs_fashion_mnist
def test_noisy_student_then_semi_supervised_distillation_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "ns"
    plan = NoisyStudentPlan(generations=2, threshold=0.2, balance=True)
    records = run_noisy_student(tiny_config(out, **{"model.dropout": 0.1}), plan, out)
    assert [record["generation"] for record in records] == [0, 1, 2]
    assert json.loads((out / "noisy_student.json").read_text()) == records
    for generation in (1, 2):
        folder = out / f"generation{generation}"
        assert (folder / "checkpoint.pth").is_file()
        labels = PseudoLabels.load(folder / "pseudo_labels.safetensors")
        assert labels.probs.shape == (600, 10)
        assert records[generation]["pseudo_labels"]["unlabeled_images"] == 480
        assert 0 <= records[generation]["pseudo_labels"]["unlabeled_accuracy"] <= 100
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert "distill_loss" in metrics[-1]["train"]
    again = run_noisy_student(tiny_config(out, **{"model.dropout": 0.1}), plan, out)  # a rerun continues: all done
    assert [r["acc1"] for r in again] == [r["acc1"] for r in records]

    teacher = str(out / "generation0" / "checkpoint.pth")
    common = ["--model", STUDENT, "--train-subset", "600", "--epochs", "1", "--batch-size", "50", "--no-progress"]
    labels_file = tmp_path / "labels.safetensors"
    assert main(["pseudo-label", *common, "--label-fraction", "0.2", "--teacher-path", teacher,
                 "--output", str(labels_file)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["pool_images"] == 600
    argv = ["train", *common, "--label-fraction", "0.2", "--unlabeled-ratio", "0.5", "--distillation-type", "hard"]
    assert main([*argv, "--teacher-path", teacher, "--output-dir", str(tmp_path / "semi")]) == 0
    assert main([*argv, "--pseudo-labels", str(labels_file), "--output-dir", str(tmp_path / "stored")]) == 0
    for other_pool in (["--label-fraction", "0.3"], ["--seed", "1"]):  # same size, other labels or images
        capsys.readouterr()
        assert main([*argv, *other_pool, "--pseudo-labels", str(labels_file)]) == 2
        assert "pseudo-labels were made for another training pool" in capsys.readouterr().err


@pytest.mark.slow
@needs_fashion_mnist
def test_a_killed_semi_supervised_run_resumes_bit_identically(tmp_path):
    from test_faults import assert_same_run, run_child  # the SIGKILL harness of the fault tests

    teacher = tmp_path / "teacher"
    fit_result = fit(tiny_config(teacher))
    assert fit_result.final["num_samples"] == 10000
    values = {
        "model.name": STUDENT,
        "model.drop_path": 0.1,
        "data.train_subset": 600,
        "data.label_fraction": 0.2,
        "data.unlabeled_ratio": 0.6,
        "optim.epochs": 2,
        "optim.batch_size": 50,
        "distill.type": "soft",
        "distill.teacher_path": str(teacher / "checkpoint.pth"),
        "run.checkpoint_steps": 2,
        "run.progress": False,
    }
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_child({**values, "run.output_dir": str(whole)}, kill_at=-1) == 0
    assert run_child({**values, "run.output_dir": str(killed)}, kill_at=15) == -signal.SIGKILL  # mid-epoch 2
    fit(with_overrides(TrainConfig(), {**values, "run.output_dir": str(killed), "run.resume": "auto"}))
    assert_same_run(whole, killed)
