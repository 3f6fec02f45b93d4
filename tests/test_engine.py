"""The training epoch and the evaluation pass, on tiny synthetic problems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deit.data import Batch
from deit.engine import EpochMeter, Precision, StepParts, evaluate, train_steps
from deit.losses import DistillationLoss
from deit.models import create_model
from deit.progress import StepProgress

CPU = torch.device("cpu")
FP32 = Precision.resolve("none", CPU)

# Each row is a permutation of 0..5, used directly as logits (the model is the identity).
# The target's rank in its row: 0 -> top-1 and top-5 hit; 1..4 -> top-5 only; 5 -> miss.
LOGITS = [
    [5, 0, 1, 2, 3, 4],  # target 0, rank 0
    [0, 5, 1, 2, 3, 4],  # target 1, rank 0
    [1, 2, 3, 4, 5, 0],  # target 4, rank 0
    [5, 4, 0, 1, 2, 3],  # target 1, rank 1
    [5, 4, 3, 2, 1, 0],  # target 4, rank 4
    [5, 4, 3, 2, 1, 0],  # target 5, rank 5
    [0, 1, 2, 3, 4, 5],  # target 3, rank 2
    [0, 1, 2, 3, 4, 5],  # target 0, rank 5
]
TARGETS = [0, 1, 4, 1, 4, 5, 3, 0]


def test_evaluate_top1_top5_and_loss_by_hand():
    dataset = TensorDataset(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGETS))
    loader = DataLoader(dataset, batch_size=3)  # batches of 3, 3, 2
    metrics = evaluate(nn.Identity(), loader, device=CPU, precision=FP32)

    assert metrics["acc1"] == 100.0 * 3 / 8
    assert metrics["acc5"] == 100.0 * 6 / 8
    assert metrics["num_samples"] == 8
    expected_loss = sum(
        -(row[t] - math.log(sum(math.exp(v) for v in row))) for row, t in zip(LOGITS, TARGETS, strict=True)
    ) / len(LOGITS)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert not any(key.startswith("cls_") for key in metrics)


def test_evaluate_with_fewer_than_five_classes():
    dataset = TensorDataset(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([1, 2]))
    metrics = evaluate(nn.Identity(), DataLoader(dataset, batch_size=2), device=CPU, precision=FP32)
    assert metrics["acc1"] == 50.0 and metrics["acc5"] == 100.0


def test_evaluate_empty_loader_raises():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        evaluate(nn.Identity(), empty, device=CPU, precision=FP32)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == targets).sum().item() / len(targets)


@pytest.mark.parametrize("eval_output", ["avg_logits", "softmax_sum", "cls"])
def test_evaluate_reports_every_head_of_a_distilled_model(eval_output):
    torch.manual_seed(0)
    model = create_model("deit_pico_distilled_patch7_28", num_classes=4, in_chans=1, eval_output=eval_output)
    images, targets = torch.randn(20, 1, 28, 28), torch.randint(0, 4, (20,))
    with torch.no_grad():
        # make the two heads disagree, so every head has its own accuracy
        model.head_dist.weight.mul_(-3)
    metrics = evaluate(model, DataLoader(TensorDataset(images, targets), batch_size=8), device=CPU, precision=FP32)

    for head in ("cls", "dist", "avg_logits", "softmax_sum"):
        assert f"{head}_acc1" in metrics and f"{head}_acc5" in metrics
    assert {"acc1", "acc5", "loss", "num_samples"} <= set(metrics)
    assert not model.training  # evaluate puts the model in eval mode

    with torch.no_grad():
        heads = model.forward_heads(images)
    cls, dist = heads["cls"], heads["dist"]
    assert metrics["cls_acc1"] == pytest.approx(_accuracy(cls, targets))
    assert metrics["dist_acc1"] == pytest.approx(_accuracy(dist, targets))
    assert metrics["avg_logits_acc1"] == pytest.approx(_accuracy(cls + dist, targets))
    assert metrics["softmax_sum_acc1"] == pytest.approx(_accuracy(cls.softmax(-1) + dist.softmax(-1), targets))
    assert metrics["acc1"] == metrics[f"{eval_output}_acc1"]  # the prediction is the configured fusion
    assert metrics["acc5"] == metrics[f"{eval_output}_acc5"]


# --- training ------------------------------------------------------------------------------------


def blobs(n_per_class: int = 32, seed: int = 0) -> TensorDataset:
    """Three well separated Gaussian blobs in 2-D."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    points = torch.cat([c + torch.randn(n_per_class, 2, generator=generator) for c in centres])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return TensorDataset(points, labels)


class CountingTeacher(nn.Module):
    """A fixed linear teacher that counts its calls and keeps the batches it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 3)
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.seen.append(x.clone())
        with torch.no_grad():
            return self.net(x)


class RecordingStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.net(x)


def as_batches(loader):
    """(images, labels) pairs as the training loaders' ``Batch`` records."""
    for images, labels in loader:
        yield Batch(images, labels, torch.arange(len(images)))


def run_epoch(model, criterion, loader, optimizer, teacher=None, lr=0.1, first_step=0, lrs=None):
    """One pass over ``loader`` with ``train_steps``: the epoch's mean losses, its step count and last lr."""

    def lr_at(step):
        if lrs is not None:
            lrs.append(step)
        return lr

    parts = StepParts(model, criterion, optimizer, lr_at, CPU, FP32, teacher=teacher)
    meter = EpochMeter()
    records = list(train_steps(parts, as_batches(loader), first_step=first_step, steps=len(loader), meter=meter))
    return {**meter.means(), "steps": len(records), "lr": records[-1].lr, "records": records}


def test_train_steps_decrease_the_loss():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    loader = DataLoader(blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    criterion = DistillationLoss("none")
    losses = [run_epoch(model, criterion, loader, optimizer)["loss"] for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    accuracy = evaluate(model, DataLoader(blobs(seed=1), batch_size=64), device=CPU, precision=FP32)["acc1"]
    assert accuracy > 90


def test_train_steps_records_and_schedule():
    model = nn.Linear(2, 3)
    loader = DataLoader(blobs(), batch_size=16)  # 96 points: 6 steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []
    metrics = run_epoch(model, DistillationLoss("none"), loader, optimizer, lr=0.05, first_step=12, lrs=steps)
    assert steps == list(range(12, 18))  # the schedule is asked for the global step of every batch
    assert [record.step for record in metrics["records"]] == steps
    assert metrics["steps"] == 6 and metrics["lr"] == 0.05
    assert optimizer.param_groups[0]["lr"] == 0.05  # and its answer is what the optimizer uses
    assert metrics["loss"] == metrics["label_loss"] > 0
    assert all(record.images == 16 and not record.stop and not record.nonfinite for record in metrics["records"])
    # a record's loss is its step's: their mean is the epoch's
    mean = sum(record.loss for record in metrics["records"]) / 6
    assert mean == pytest.approx(metrics["loss"], rel=1e-6)
    assert model.training


def test_a_stop_vote_is_reported_with_the_step_it_came_in():
    model = nn.Linear(2, 3)
    parts = StepParts(model, DistillationLoss("none"), torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 0.1,
                      CPU, FP32)  # fmt: skip
    votes = iter([False, False, True])
    records = train_steps(parts, as_batches(DataLoader(blobs(), batch_size=16)), first_step=0, steps=6,
                          stop_requested=lambda: next(votes))  # fmt: skip
    assert [record.stop for record in (next(records), next(records), next(records))] == [False, False, True]


def test_the_step_sums_across_processes_on_the_loss_device():
    """One collective per step, of a tensor on the device the loss is on (NCCL serves CUDA tensors only)."""
    model = nn.Linear(2, 3)
    parts = StepParts(model, DistillationLoss("none"), torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 0.1,
                      CPU, FP32)  # fmt: skip
    reduced = []

    def as_two_processes(values):  # as if a second process had the same loss and no stop
        reduced.append(values)
        return values * torch.tensor([2.0, 2.0, 1.0, 2.0])

    loader = DataLoader(blobs(), batch_size=16)
    records = list(train_steps(parts, as_batches(loader), first_step=0, steps=3, reduce=as_two_processes))
    assert len(reduced) == 3 and all(values.device == CPU and values.shape == (4,) for values in reduced)
    assert [record.loss for record in records] == pytest.approx([values[0].item() for values in reduced])


def test_teacher_is_only_called_when_the_criterion_needs_it():
    loader = DataLoader(blobs(), batch_size=16)
    teacher = CountingTeacher()
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run_epoch(model, DistillationLoss("none"), loader, optimizer, teacher=teacher)
    assert teacher.calls == 0

    metrics = run_epoch(model, DistillationLoss("hard", alpha=0.5), loader, optimizer, teacher=teacher)
    assert teacher.calls == 6
    assert "distill_loss" in metrics
    assert metrics["loss"] == pytest.approx(0.5 * metrics["label_loss"] + 0.5 * metrics["distill_loss"], rel=1e-5)


def test_teacher_sees_the_batch_the_student_saw():
    loader = DataLoader(blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    teacher, student = CountingTeacher(), RecordingStudent()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    run_epoch(student, DistillationLoss("soft", alpha=0.5, tau=2.0), loader, optimizer, teacher=teacher)
    assert len(teacher.seen) == len(student.seen) == 6
    for a, b in zip(teacher.seen, student.seen, strict=True):
        assert torch.equal(a, b)
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_distilled_vit_trains_with_a_teacher():
    torch.manual_seed(0)
    student = create_model("deit_pico_distilled_patch7_28", num_classes=3, in_chans=1)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 3, (16,))
    network = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3)).requires_grad_(False)

    def teacher(images, indices=None):  # a TeacherLike: the step passes the images' training-set indices too
        return network(images)

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    metrics = run_epoch(
        student,
        DistillationLoss("hard"),
        DataLoader(TensorDataset(images, labels), batch_size=8),
        optimizer,
        teacher=teacher,
        lr=1e-3,
    )
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss"])
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "head_dist.weight" in changed and "dist_token" in changed


def test_a_nan_loss_ends_the_steps_before_the_optimizer_takes_one():
    points = torch.randn(8, 2)
    points[3, 0] = float("nan")
    loader = DataLoader(TensorDataset(points, torch.zeros(8, dtype=torch.long)), batch_size=4)
    model = nn.Linear(2, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = run_epoch(model, DistillationLoss("none"), loader, optimizer, first_step=5)["records"]
    assert [(record.step, record.nonfinite) for record in records] == [(5, 1)]  # the last record: no step 6
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))  # no step was taken


def test_precision_resolve():
    assert Precision.resolve("bf16", CPU).dtype == torch.bfloat16
    assert Precision.resolve("none", CPU).describe() == "fp32 on cpu"
    with pytest.raises(ValueError, match="fp8"):
        Precision.resolve("fp8", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(native, monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert Precision.resolve("auto", CPU).dtype == (torch.bfloat16 if native else None)
    caplog.clear()
    Precision.resolve("bf16", CPU)  # asked for explicitly: kept, with a warning where it is emulated
    assert ("emulated" in caplog.text) is not native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert Precision.resolve("auto", torch.device("cuda")).dtype == torch.bfloat16


def test_progress_in_a_log_file_is_a_line_every_few_steps(caplog, capsys):
    report = StepProgress(10, "epoch 1/1", enabled=True, log_interval=4)
    with caplog.at_level("INFO", logger="deit"):  # under pytest stderr is captured, so not a terminal
        for _ in range(10):
            report.update(4, loss=1.0, lr=0.1)
    report.close()
    lines = [record.getMessage() for record in caplog.records if "step" in record.getMessage()]
    assert [line.split(",")[0] for line in lines] == [
        "epoch 1/1 step 4/10",
        "epoch 1/1 step 8/10",
    ]
    assert all("im/s" in line and "loss" in line and "left" in line for line in lines)
    assert "\r" not in capsys.readouterr().err  # no bar frames
