"""Shared steps of the model stages (prune, quantize, distill)."""

from __future__ import annotations

import shutil

from torch import nn

from shrinkflow.artifacts import ModelHeader, load_model
from shrinkflow.data import Splits
from shrinkflow.io import atomic_path
from shrinkflow.paths import UPSTREAM
from shrinkflow.training import predict, quality
from tasks import Context


def load_upstream(stage: str, ctx: Context) -> tuple[nn.Module, ModelHeader]:
    return load_model(ctx.paths.model(UPSTREAM[stage]))


def pass_through(stage: str, ctx: Context) -> None:
    """A disabled stage: its model file is a byte-identical copy of its input's."""
    with atomic_path(ctx.paths.model(stage)) as tmp:
        shutil.copyfile(ctx.paths.model(UPSTREAM[stage]), tmp)


def val_metric(model: nn.Module, splits: Splits) -> float | None:
    """Validation accuracy (or MSE) of a model as loaded from its file."""
    Xv, yv = splits.tensors("val")
    return quality(predict(model, Xv), yv, splits.task) if len(Xv) else None
