"""train_teacher: train the teacher, or import an already-trained checkpoint."""

from __future__ import annotations

import time

from schemas.outputs import TrainTeacherOutput
from schemas.params import TrainTeacherParams
from shrinkflow.artifacts import ModelHeader, load_checkpoint, save_model
from shrinkflow.data import Splits, load_splits
from shrinkflow.errors import InputError
from shrinkflow.measure import model_file
from shrinkflow.training import fit, resolve_device, save_teacher_outputs, seed_everything
from tasks import Context
from tasks._common import val_metric

STAGE = "train_teacher"


def run(params: TrainTeacherParams, ctx: Context) -> TrainTeacherOutput:
    splits: Splits = load_splits(ctx.paths.splits)
    header = ModelHeader.for_data(params.model, splits)
    start = time.perf_counter()
    if params.checkpoint:
        model, header = load_checkpoint(ctx.paths.root / params.checkpoint, header, "train_teacher.checkpoint")
        val, epochs = val_metric(model, splits), 0
    else:
        seed_everything(ctx.seed)
        try:
            model = header.build()
        except ValueError as exc:
            raise InputError(f"train_teacher.model: {exc}") from exc
        res = fit(
            model, splits, epochs=params.epochs, batch_size=params.batch_size, optimizer=params.optimizer,
            seed=ctx.seed, device=resolve_device(ctx.device), where=STAGE, live_dir=ctx.paths.live(STAGE),
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
