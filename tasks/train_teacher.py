"""train_teacher: train the teacher, or import an already-trained checkpoint."""

from __future__ import annotations

import time

from schemas.outputs import TrainTeacherOutput
from schemas.params import TrainTeacherParams
from shrinkflow.artifacts import ModelHeader, save_model
from shrinkflow.compat import refusals
from shrinkflow.data import Splits, load_splits
from shrinkflow.errors import InputError, ParamsError
from shrinkflow.loading import load_checkpoint
from shrinkflow.measure import model_file
from shrinkflow.training import fit, save_teacher_outputs, seed_everything
from tasks import Context
from tasks._common import method_env, no_curves, val_metric

STAGE = "train_teacher"


def preflight(model, header: ModelHeader, ctx: Context) -> None:
    """Refuse now, before training, a run whose prune or quantize method cannot work on this model."""
    if ctx.pipeline is None:
        return
    found = refusals(model, header, ctx.pipeline.prune, ctx.pipeline.quantize)
    if found:
        raise ParamsError("; ".join(found) + " (checked before training the teacher)")


def run(params: TrainTeacherParams, ctx: Context) -> TrainTeacherOutput:
    splits: Splits = load_splits(ctx.paths.splits)
    header = ModelHeader.for_data(params.model, splits)
    start = time.perf_counter()
    if params.checkpoint:
        model, header = load_checkpoint(ctx.paths.root / params.checkpoint, header, "train_teacher.checkpoint", ctx.trusted)
        preflight(model, header, ctx)
        val, epochs = val_metric(model, splits), 0
        no_curves(STAGE, ctx)
    else:
        seed_everything(ctx.seed)
        try:
            model = header.build(allow=ctx.trusted)
        except InputError as exc:
            raise type(exc)(f"train_teacher.model: {exc}") from None
        preflight(model, header, ctx)
        with method_env(STAGE, ctx, splits, curves=True) as env:
            res = fit(
                model, splits, epochs=params.epochs, batch_size=params.batch_size, optimizer=params.optimizer,
                seed=ctx.seed, device=env.device, where=STAGE, on_epoch=env.on_epoch,
            )
        val, epochs = res.val_metric, res.epochs
    path = ctx.paths.model(STAGE)
    save_model(model, path, header)
    # The transfer set of prune's fine-tuning and of distill is the training split:
    # its teacher outputs are computed once, here, and cached by DVC with the teacher.
    save_teacher_outputs(model, splits.tensors("train")[0], ctx.paths.teacher_outputs)
    return TrainTeacherOutput(
        model=model_file(path, model, header, ctx.paths.root),
        imported=bool(params.checkpoint),
        epochs=epochs,
        val_metric=val,
        seconds=round(time.perf_counter() - start, 3),
    )
