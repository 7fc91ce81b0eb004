"""What every compression method shares: its environment, and fine-tuning with it.

Each method (a ``prune``, ``quantize`` or ``distill`` ``method``) is one typed entry
point registered by that name::

    method(model, header, params, env) -> (model, header)

``params`` is the method's own params model (``schemas.prune.MagnitudePrune``, ...),
``env`` an :class:`Env`; the returned header records what the method did to the
architecture (a transform named after the method), so the file it is saved to
rebuilds the result. The stages (``tasks/``), the benchmarks and the tests all
call these entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from schemas.common import Finetune
from shrinkflow.artifacts import ModelHeader
from shrinkflow.data import Splits
from shrinkflow.errors import ParamsError
from shrinkflow.losses import logits_loss, regression_loss
from shrinkflow.training import FitResult, fit, predict, task_loss

P = TypeVar("P")
#: A method's entry point: (model, header, its params model, env) -> (model, header).
Method = Callable[[nn.Module, ModelHeader, P, "Env"], tuple[nn.Module, ModelHeader]]
#: ``finetune(model, epochs, after_step)``: trains ``model`` in place.
Finetuner = Callable[[nn.Module, int, Callable[[nn.Module], None] | None], FitResult]


@dataclass(frozen=True)
class Env:
    """What a method may use besides the model, its header and its params.

    splits: the prepared data (training split = the transfer set); None when a
        method runs without data (it refuses if it needs some).
    teacher / teacher_outputs: the teacher, and its outputs on the training split
        (soft targets); the outputs are computed from the teacher when not given.
    on_epoch: receives every training epoch's row (per-epoch curves); None = none.
    notes: what a method reports besides the model (e.g. the bit widths it chose and
        the sensitivity they came from); the stage writes them into its manifest.
    """

    splits: Splits | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: nn.Module | None = None
    teacher_outputs: torch.Tensor | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def data(self, where: str) -> Splits:
        """The prepared data, or a ParamsError naming ``where`` when there is none."""
        if self.splits is None:
            raise ParamsError(f"{where} needs training data (data/prepared): run the data stage first")
        return self.splits

    def soft_targets(self, where: str) -> torch.Tensor:
        """The teacher's outputs on the training split."""
        if self.teacher_outputs is not None:
            return self.teacher_outputs
        if self.teacher is None:
            raise ParamsError(f"{where} uses the teacher's soft targets, but no teacher is available")
        return predict(self.teacher, self.data(where).tensors("train")[0])

    def finetuner(self, ft: Finetune, where: str, penalty: Callable[[], torch.Tensor] | None = None) -> Finetuner:
        """``finetune(model, epochs, after_step)`` with ``ft``'s optimizer and batch size, plus the
        teacher's soft targets when ``ft.distill_from_teacher``.

        Args:
            penalty: a regularizer added to every batch's loss (e.g. a variational KL term).
        """
        splits = self.data(where)
        loss_fn, extra = None, []
        if ft.distill_from_teacher:
            extra = [self.soft_targets(where)]
            loss_fn = (
                logits_loss(ft.temperature, ft.alpha) if splits.task == "classification" else regression_loss(alpha=ft.alpha)
            )
        if penalty is not None:
            base = loss_fn or task_loss(splits.task)

            def loss_fn(out: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
                return base(out, *targets) + penalty()

        def finetune(model: nn.Module, epochs: int, after_step: Callable[[nn.Module], None] | None) -> FitResult:
            return fit(
                model, splits, epochs=epochs, batch_size=ft.batch_size, optimizer=ft.optimizer, seed=self.seed,
                device=self.device, where=where, loss_fn=loss_fn, extra_targets=extra, after_step=after_step,
                on_epoch=self.on_epoch,
            )

        return finetune
