"""Losses against a teacher's outputs (soft targets), shared by distillation and every fine-tuning."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: A distillation loss for ``fit``: loss(student_out, labels, teacher_out, *more_teacher_targets).
KDLoss = Callable[..., torch.Tensor]


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch.

    The T² factor keeps the soft gradients' magnitude independent of T: the
    gradient with respect to a student logit is ``T·(p_T^student − p_T^teacher)``
    per sample, which tends to ``(z − v)/N`` (zero-mean logits) as T grows.
    """
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def logits_loss(temperature: float, alpha: float, use_labels: bool = True) -> KDLoss:
    """Hinton et al. 2015: ``alpha·T²·KL + (1-alpha)·CE(student, y)``; the KL alone without labels."""

    def loss(student: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        soft = soft_kl(student, teacher, temperature)
        if not use_labels:
            return soft
        return alpha * soft + (1 - alpha) * F.cross_entropy(student, y)

    return loss


def regression_loss(alpha: float, use_labels: bool = True) -> KDLoss:
    """``alpha·MSE(student, teacher) + (1-alpha)·MSE(student, y)``; the first term alone without labels."""

    def loss(student: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        soft = F.mse_loss(student, teacher)
        if not use_labels:
            return soft
        return alpha * soft + (1 - alpha) * F.mse_loss(student, y)

    return loss
