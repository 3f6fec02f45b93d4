"""Losses, checked against values computed by hand with the math module on tiny 2x3 logits."""

from __future__ import annotations

import math

import pytest
import torch

from deit.losses import (
    DistillationLoss,
    hard_distillation_loss,
    label_cross_entropy,
    soft_distillation_loss,
    soft_target_cross_entropy,
)

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # the distillation head's logits
CLS = [[0.5, -0.5, 1.5], [2.0, 0.0, -1.0]]  # the class head's logits
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.5, -2.0]]  # argmax 0 and 1, no ties
TARGET = [1, 2]


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def softmax(row, tau=1.0):
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def ce(row, label):
    return -math.log(softmax(row)[label])


def mean(values):
    return sum(values) / len(values)


def kl_sum(student, teacher, tau):
    """sum over the batch of KL(softmax(teacher / tau) || softmax(student / tau))."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p, q = softmax(t_row, tau), softmax(s_row, tau)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return total


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


# --- the pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_batchmean(tau):
    expected = tau**2 * kl_sum(STUDENT, TEACHER, tau) / 2
    got = soft_distillation_loss(t(STUDENT), t(TEACHER), tau, "batchmean")
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_official_divides_by_batch_times_classes(tau):
    expected = tau**2 * kl_sum(STUDENT, TEACHER, tau) / (2 * 3)
    got = soft_distillation_loss(t(STUDENT), t(TEACHER), tau, "official")
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_distillation_carries_the_tau_squared_factor():
    # the KL at tau = 3 alone is much smaller than the loss: the loss is 9 times the KL
    kl_only = kl_sum(STUDENT, TEACHER, 3.0) / 2
    got = soft_distillation_loss(t(STUDENT), t(TEACHER), 3.0).item()
    assert got == pytest.approx(9 * kl_only, rel=1e-5)
    assert got != pytest.approx(kl_only, rel=1e-2)


def test_soft_distillation_is_zero_when_student_equals_teacher():
    assert soft_distillation_loss(t(TEACHER), t(TEACHER), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_distillation_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="mean"):
        soft_distillation_loss(t(STUDENT), t(TEACHER), 1.0, "mean")


def test_hard_distillation_is_cross_entropy_against_teacher_argmax():
    teacher_labels = [argmax(row) for row in TEACHER]
    assert teacher_labels == [0, 1]
    expected = mean([ce(row, label) for row, label in zip(STUDENT, teacher_labels, strict=True)])
    assert hard_distillation_loss(t(STUDENT), t(TEACHER)).item() == pytest.approx(expected, rel=1e-6)
    # scaling the teacher's logits does not change its decision, nor the loss
    assert hard_distillation_loss(t(STUDENT), t(TEACHER) * 100).item() == pytest.approx(expected, rel=1e-6)


def test_label_cross_entropy_with_integer_targets():
    expected = mean([ce(row, y) for row, y in zip(CLS, TARGET, strict=True)])
    assert label_cross_entropy(t(CLS), torch.tensor(TARGET)).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_on_integer_targets():
    eps = 0.1
    expected = mean(
        [
            (1 - eps) * ce(row, y) + eps * mean([-math.log(p) for p in softmax(row)])
            for row, y in zip(CLS, TARGET, strict=True)
        ]
    )
    got = label_cross_entropy(t(CLS), torch.tensor(TARGET), label_smoothing=eps).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(label_cross_entropy(t(CLS), torch.tensor(TARGET)).item(), rel=1e-3)


def test_soft_targets_from_mixup():
    probs = [[0.7, 0.3, 0.0], [0.1, 0.2, 0.7]]
    expected = mean(
        [
            -sum(p * math.log(q) for p, q in zip(p_row, softmax(row), strict=True))
            for row, p_row in zip(CLS, probs, strict=True)
        ]
    )
    assert soft_target_cross_entropy(t(CLS), t(probs)).item() == pytest.approx(expected, rel=1e-6)
    # (B, C) targets take the soft path, whatever label_smoothing says (Mixup already smoothed them)
    assert label_cross_entropy(t(CLS), t(probs), label_smoothing=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_one_hot_soft_targets_equal_hard_labels():
    one_hot = torch.nn.functional.one_hot(torch.tensor(TARGET), 3).float()
    soft = label_cross_entropy(t(CLS), one_hot)
    hard = label_cross_entropy(t(CLS), torch.tensor(TARGET), label_smoothing=0.0)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)


# --- the combined objective ----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_hard_objective_weights(alpha):
    criterion = DistillationLoss("hard", alpha=alpha)
    parts = criterion.components((t(CLS), t(STUDENT)), torch.tensor(TARGET), t(TEACHER))
    label = mean([ce(row, y) for row, y in zip(CLS, TARGET, strict=True)])
    distill = mean([ce(row, argmax(tr)) for row, tr in zip(STUDENT, TEACHER, strict=True)])
    assert parts["label_loss"].item() == pytest.approx(label, rel=1e-6)
    assert parts["distill_loss"].item() == pytest.approx(distill, rel=1e-6)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * label + alpha * distill, rel=1e-6)


def test_soft_objective_weights_with_temperature():
    criterion = DistillationLoss("soft", alpha=0.3, tau=3.0, kl_reduction="official")
    loss = criterion((t(CLS), t(STUDENT)), torch.tensor(TARGET), t(TEACHER)).item()
    label = mean([ce(row, y) for row, y in zip(CLS, TARGET, strict=True)])
    distill = 9 * kl_sum(STUDENT, TEACHER, 3.0) / 6
    assert loss == pytest.approx(0.7 * label + 0.3 * distill, rel=1e-5)


def test_alpha_zero_is_exactly_the_label_loss():
    outputs, target = (t(CLS), t(STUDENT)), torch.tensor(TARGET)
    for kind in ("soft", "hard"):
        loss = DistillationLoss(kind, alpha=0.0, label_smoothing=0.1)(outputs, target, t(TEACHER))
        assert torch.equal(loss, label_cross_entropy(t(CLS), target, label_smoothing=0.1))


def test_no_distillation_with_two_heads_averages_their_label_losses():
    loss = DistillationLoss("none")((t(CLS), t(STUDENT)), torch.tensor(TARGET))
    cls_ce = mean([ce(row, y) for row, y in zip(CLS, TARGET, strict=True)])
    dist_ce = mean([ce(row, y) for row, y in zip(STUDENT, TARGET, strict=True)])
    assert loss.item() == pytest.approx((cls_ce + dist_ce) / 2, rel=1e-6)


def test_no_distillation_with_one_head_is_the_label_loss():
    criterion = DistillationLoss("none")
    assert not criterion.needs_teacher
    parts = criterion.components(t(CLS), torch.tensor(TARGET))
    assert set(parts) == {"loss", "label_loss"}
    assert parts["loss"].item() == pytest.approx(mean([ce(r, y) for r, y in zip(CLS, TARGET, strict=True)]), rel=1e-6)


def test_single_head_student_gets_both_terms_on_its_head():
    loss = DistillationLoss("hard", alpha=0.5)(t(STUDENT), torch.tensor(TARGET), t(TEACHER)).item()
    label = mean([ce(row, y) for row, y in zip(STUDENT, TARGET, strict=True)])
    distill = mean([ce(row, argmax(tr)) for row, tr in zip(STUDENT, TEACHER, strict=True)])
    assert loss == pytest.approx(0.5 * label + 0.5 * distill, rel=1e-6)


def test_distillation_with_mixup_targets():
    probs = t([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7]])
    loss = DistillationLoss("hard", alpha=0.5)((t(CLS), t(STUDENT)), probs, t(TEACHER)).item()
    label = soft_target_cross_entropy(t(CLS), probs).item()
    distill = mean([ce(row, argmax(tr)) for row, tr in zip(STUDENT, TEACHER, strict=True)])
    assert loss == pytest.approx(0.5 * label + 0.5 * distill, rel=1e-6)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_missing_teacher_logits_raise(kind):
    criterion = DistillationLoss(kind)
    assert criterion.needs_teacher
    with pytest.raises(ValueError, match="teacher"):
        criterion((t(CLS), t(STUDENT)), torch.tensor(TARGET))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distillation_type": "medium"}, "medium"),
        ({"distillation_type": "soft", "alpha": 1.5}, "alpha"),
        ({"distillation_type": "soft", "alpha": -0.1}, "alpha"),
        ({"distillation_type": "soft", "tau": 0.0}, "temperature"),
        ({"distillation_type": "soft", "tau": -1.0}, "temperature"),
        ({"distillation_type": "soft", "kl_reduction": "sum"}, "sum"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


# --- where the gradients go ----------------------------------------------------------------------


def _grads(criterion, target=None):
    cls, dist = t(CLS).requires_grad_(), t(STUDENT).requires_grad_()
    criterion((cls, dist), torch.tensor(TARGET) if target is None else target, t(TEACHER)).backward()
    return cls.grad, dist.grad


def test_hard_distillation_with_alpha_one_leaves_the_class_head_untouched():
    cls_grad, dist_grad = _grads(DistillationLoss("hard", alpha=1.0))
    assert torch.count_nonzero(cls_grad) == 0
    assert dist_grad.abs().sum() > 0


def test_alpha_zero_leaves_the_distillation_head_untouched():
    for kind in ("soft", "hard"):
        cls_grad, dist_grad = _grads(DistillationLoss(kind, alpha=0.0))
        assert torch.count_nonzero(dist_grad) == 0
        assert cls_grad.abs().sum() > 0


def test_hard_distillation_gradients_by_hand():
    # d CE / d logits = (softmax - one_hot) / B; the class head sees labels, the distillation head the teacher
    alpha = 0.5
    cls_grad, dist_grad = _grads(DistillationLoss("hard", alpha=alpha))
    expected_cls = [
        [(1 - alpha) * (p - (c == y)) / 2 for c, p in enumerate(softmax(row))]
        for row, y in zip(CLS, TARGET, strict=True)
    ]
    expected_dist = [
        [alpha * (p - (c == argmax(tr))) / 2 for c, p in enumerate(softmax(row))]
        for row, tr in zip(STUDENT, TEACHER, strict=True)
    ]
    assert torch.allclose(cls_grad, t(expected_cls), atol=1e-6)
    assert torch.allclose(dist_grad, t(expected_dist), atol=1e-6)


def test_soft_distillation_gradient_by_hand():
    # d/ds [tau^2 KL(p_t || softmax(s / tau))] = tau * (softmax(s / tau) - p_t), divided by B for batchmean
    tau, alpha = 3.0, 1.0
    cls_grad, dist_grad = _grads(DistillationLoss("soft", alpha=alpha, tau=tau))
    expected = [
        [tau * (q - p) / 2 for q, p in zip(softmax(s_row, tau), softmax(t_row, tau), strict=True)]
        for s_row, t_row in zip(STUDENT, TEACHER, strict=True)
    ]
    assert torch.allclose(dist_grad, t(expected), atol=1e-6)
    assert torch.count_nonzero(cls_grad) == 0
