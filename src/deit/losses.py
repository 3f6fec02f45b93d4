"""Training losses: label cross-entropy and the DeiT distillation objectives.

The loss sees logits only. The engine runs the teacher under ``no_grad`` on the
very batch the student saw (after Mixup / CutMix / erasing) and passes its
logits in; nothing here calls a model.

For a distilled student the class head learns from the labels and the
distillation head from the teacher:

    soft:  (1 - alpha) * CE(cls, y) + alpha * tau^2 * KL(softmax(t / tau) || softmax(dist / tau))
    hard:  (1 - alpha) * CE(cls, y) + alpha * CE(dist, argmax t)         (alpha = 1/2 in the paper)
    none:  CE(cls, y), and for a distilled student 1/2 CE(cls, y) + 1/2 CE(dist, y), so the
           distillation head is never left untrained and then fused into the prediction.

A student without a distillation token gets both terms on its single head.

Unlabelled images (label -1, see ``deit.data.unlabeled``) have no label term:
the class head learns from the labelled images of the batch only, the
distillation head from the teacher on every image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deit.data.unlabeled import UNLABELED

DISTILLATION_TYPES = ("none", "soft", "hard")
# How the summed KL divergence of soft distillation is divided:
#   batchmean  by the batch size: the KL per sample, as its definition and the paper's formula say
#   official   by batch x classes, as the official DeiT code does (kl_div(..., 'sum') / numel); with
#              C classes the distillation term is C times smaller than with batchmean
KL_REDUCTIONS = ("batchmean", "official")

StudentOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def soft_target_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability vector per sample (Mixup / CutMix targets), mean over the batch."""
    return torch.sum(-target_probs * F.log_softmax(logits, dim=-1), dim=-1).mean()


def label_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class indices (B,) with label smoothing, or for soft targets (B, C) as given.

    Soft targets from Mixup / CutMix already carry their label smoothing. Class
    index -1 marks an unlabelled image: it is left out of the mean.
    """
    logits = logits.float()
    if target.ndim == 2:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, ignore_index=UNLABELED)


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, reduction: str = "batchmean"
) -> torch.Tensor:
    """tau^2 * KL(teacher || student) at temperature tau, reduced as ``reduction`` says (see KL_REDUCTIONS)."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown KL reduction {reduction!r}; choose one of {KL_REDUCTIONS}")
    student_log_probs = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl_sum = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    divisor = student_logits.shape[0] if reduction == "batchmean" else student_logits.numel()
    return kl_sum * (tau * tau) / divisor


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's decision, argmax over its logits."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


class DistillationLoss(nn.Module):
    """The training objective: labels on the class head, the teacher on the distillation head."""

    def __init__(
        self,
        distillation_type: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: str = "batchmean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"unknown distillation type {distillation_type!r}; choose one of {DISTILLATION_TYPES}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"distillation temperature must be positive, got {tau}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"unknown KL reduction {kl_reduction!r}; choose one of {KL_REDUCTIONS}")
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.kl_reduction = kl_reduction
        self.label_smoothing = label_smoothing

    @property
    def needs_teacher(self) -> bool:
        return self.distillation_type != "none"

    def components(
        self, outputs: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The total loss and its label and distillation parts, for logging."""
        if isinstance(outputs, tuple):
            cls_logits, dist_logits = outputs
        else:
            cls_logits = dist_logits = outputs
        label_loss = label_cross_entropy(cls_logits, target, self.label_smoothing)
        if self.distillation_type == "none":
            if isinstance(outputs, tuple):
                dist_label_loss = label_cross_entropy(dist_logits, target, self.label_smoothing)
                label_loss = (label_loss + dist_label_loss) / 2
            return {"loss": label_loss, "label_loss": label_loss}
        if teacher_logits is None:
            raise ValueError(f"{self.distillation_type} distillation needs the teacher's logits")
        if self.distillation_type == "soft":
            distill_loss = soft_distillation_loss(dist_logits, teacher_logits, self.tau, self.kl_reduction)
        else:
            distill_loss = hard_distillation_loss(dist_logits, teacher_logits)
        loss = (1 - self.alpha) * label_loss + self.alpha * distill_loss
        return {"loss": loss, "label_loss": label_loss, "distill_loss": distill_loss}

    def forward(
        self, outputs: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.components(outputs, target, teacher_logits)["loss"]

    def extra_repr(self) -> str:
        return (
            f"type={self.distillation_type}, alpha={self.alpha}, tau={self.tau}, "
            f"kl_reduction={self.kl_reduction}, label_smoothing={self.label_smoothing}"
        )
