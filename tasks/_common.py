"""Shared steps of the model stages (prune, quantize, distill)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from schemas.paths import UPSTREAM
from shrinkflow.artifacts import ModelHeader
from shrinkflow.data import Splits
from shrinkflow.io import atomic_path, write_json, write_text
from shrinkflow.loading import load_model
from shrinkflow.methods import Env
from shrinkflow.training import predict, quality, resolve_device, teacher_outputs
from tasks import Context

log = logging.getLogger("shrinkflow")


def load(stage: str, ctx: Context) -> tuple[nn.Module, ModelHeader]:
    """The model stage ``stage`` wrote, loaded with the pipeline's trusted modules."""
    return load_model(ctx.paths.model(stage), ctx.trusted)


def load_upstream(stage: str, ctx: Context) -> tuple[nn.Module, ModelHeader]:
    return load(UPSTREAM[stage], ctx)


def pass_through(stage: str, ctx: Context) -> None:
    """A disabled stage: its model file is a byte-identical copy of its input's."""
    with atomic_path(ctx.paths.model(stage)) as tmp:
        shutil.copyfile(ctx.paths.model(UPSTREAM[stage]), tmp)


def val_metric(model: nn.Module, splits: Splits) -> float | None:
    """Validation accuracy (or MSE) of a model as loaded from its file."""
    Xv, yv = splits.tensors("val")
    return quality(predict(model, Xv), yv, splits.task) if len(Xv) else None


@contextlib.contextmanager
def method_env(stage: str, ctx: Context, splits: Splits | None, *, teacher: bool = False, curves: bool = False) -> Iterator[Env]:
    """The methods' environment for ``stage``: data, seed, device, the teacher with its stored outputs,
    and (``curves``) every training epoch logged to ``reports/live/<stage>`` with dvclive."""
    model, outputs = None, None
    if teacher and splits is not None:
        model, _ = load("train_teacher", ctx)
        outputs = teacher_outputs(model, splits.tensors("train")[0], ctx.paths.teacher_outputs)
    live = _live(ctx.paths.live(stage)) if curves else None

    def on_epoch(row: dict[str, float]) -> None:
        for k, v in row.items():
            live.log_metric(k, v)
        live.next_step()

    try:
        yield Env(
            splits=splits, seed=ctx.seed, device=resolve_device(ctx.device), teacher=model, teacher_outputs=outputs,
            on_epoch=on_epoch if live is not None else None,
        )
    finally:
        if live is not None:
            live.end()


def _live(folder: Path):
    from dvclive import Live

    try:
        # dvcyaml=False: dvclive must not rewrite dvc.yaml from inside a stage.
        return Live(dir=str(folder), save_dvc_exp=False, dvcyaml=False, report=None)
    except Exception as exc:  # dvclive refuses e.g. a git repo without commits
        log.warning("per-epoch curves disabled (%s): dvclive needs a git repo with at least one commit", exc)
        return None


def no_curves(stage: str, ctx: Context) -> None:
    """A stage that trained nothing: its (DVC-declared) curves folder exists and says why it is empty."""
    folder = ctx.paths.live(stage)
    if folder.is_dir():
        shutil.rmtree(folder)
    (folder / "plots" / "metrics").mkdir(parents=True)
    write_json(folder / "metrics.json", {})
    write_text(folder / "README.md", f"No per-epoch curves: the {stage} stage trained nothing in this run.\n")
