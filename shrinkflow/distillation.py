"""Distillation losses: one per ``distill.method``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: A distillation loss for ``fit``: loss(student_out, labels, teacher_out).
KDLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def logits_loss(temperature: float, alpha: float) -> KDLoss:
    """Hinton et al. 2015: ``alpha·T²·KL(p_T^teacher ‖ p_T^student) + (1-alpha)·CE(student, y)``.

    The T² factor keeps the soft gradients' magnitude independent of T.
    """

    def loss(student: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        soft = F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(student, y)

    return loss


def regression_loss(temperature: float, alpha: float) -> KDLoss:
    """``alpha·MSE(student, teacher) + (1-alpha)·MSE(student, y)`` (temperature unused)."""

    def loss(student: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return alpha * F.mse_loss(student, teacher) + (1 - alpha) * F.mse_loss(student, y)

    return loss


DISTILL_LOSSES: dict[str, Callable[[float, float], KDLoss]] = {
    "logits": logits_loss,
    "regression": regression_loss,
}


def resolve_method(method: str, task: str) -> str:
    if method == "auto":
        return "logits" if task == "classification" else "regression"
    return method
