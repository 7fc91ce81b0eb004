"""train_teacher: train the teacher, or import an already-trained checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from schemas.outputs import TrainTeacherOutput
from schemas.params import TrainTeacherParams
from shrinkflow.artifacts import ModelHeader, load_model, save_model
from shrinkflow.data import Splits, load_splits
from shrinkflow.errors import InputError
from shrinkflow.measure import model_file
from shrinkflow.training import fit, predict, quality, resolve_device, seed_everything
from tasks import Context

STAGE = "train_teacher"


def _import_checkpoint(path: str, header: ModelHeader, root: Path) -> tuple[torch.nn.Module, ModelHeader]:
    """Load a teacher from a shrinkflow model file or a plain state dict, safely."""
    file = root / path
    if not file.is_file():
        raise InputError(f"train_teacher.checkpoint {path!r}: file not found")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"train_teacher.checkpoint {path!r} cannot be loaded with weights_only=True ({exc}); "
            "save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(payload, dict) and "shrinkflow" in payload:
        return load_model(file)
    model = header.build()
    try:
        model.load_state_dict(payload)
    except Exception as exc:
        raise InputError(
            f"train_teacher.checkpoint {path!r} does not fit train_teacher.model ({header.spec}): {exc}"
        ) from exc
    return model, header


def run(params: TrainTeacherParams, ctx: Context) -> TrainTeacherOutput:
    splits: Splits = load_splits(ctx.paths.splits)
    header = ModelHeader(
        spec=params.model.model_dump(mode="json", by_alias=True),
        input_shape=splits.input_shape,
        out_features=splits.out_features,
        task=splits.task,
    )
    start = time.perf_counter()
    if params.checkpoint:
        model, header = _import_checkpoint(params.checkpoint, header, ctx.paths.root)
        Xv, yv = splits.tensors("val")
        val = quality(predict(model, Xv), yv, splits.task) if len(Xv) else None
        epochs = 0
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
    return TrainTeacherOutput(
        model=model_file(path, model, header, ctx.paths.root),
        imported=bool(params.checkpoint),
        epochs=epochs,
        val_metric=val,
        seconds=round(time.perf_counter() - start, 3),
    )
