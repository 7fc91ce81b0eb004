"""distill: train under the teacher's soft targets.

``student: compressed`` continues training the quantize output, keeping its zeros
and its quantization (``distillation.distill``), so the result is the same small
model with recovered accuracy. A model spec trains a new student from the teacher.
"""

from __future__ import annotations

import dataclasses

from schemas.distill import DistillParams
from schemas.outputs import DistillOutput
from shrinkflow.artifacts import ModelHeader, save_model
from shrinkflow.data import load_splits
from shrinkflow.distillation import check_method, distill
from shrinkflow.errors import InputError
from shrinkflow.measure import model_file
from shrinkflow.training import seed_everything
from tasks import Context
from tasks._common import load, load_upstream, method_env, no_curves, pass_through, val_metric

STAGE = "distill"


def run(params: DistillParams, ctx: Context) -> DistillOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits)
    method = None
    input_val = None
    if params.enabled:
        method = check_method(params.method, splits.task)
        seed_everything(ctx.seed)
        if params.student == "compressed":
            student, header = load_upstream(STAGE, ctx)
            input_val = val_metric(student, splits)
        else:
            header = ModelHeader.for_data(params.student, splits)
            try:
                student = header.build(allow=ctx.trusted)
            except InputError as exc:
                raise type(exc)(f"distill.student: {exc}") from None
        with method_env(STAGE, ctx, splits, teacher=True, curves=True) as env:
            if params.transfer_limit is not None and params.transfer_limit < len(splits.X_train):
                n = params.transfer_limit
                env = dataclasses.replace(
                    env, splits=dataclasses.replace(splits, X_train=splits.X_train[:n], y_train=splits.y_train[:n]),
                    teacher_outputs=env.teacher_outputs[:n],
                )
            student, header = distill(student, header, params, env)
        save_model(student, path, header)
    else:
        pass_through(STAGE, ctx)
        no_curves(STAGE, ctx)
    model, header = load(STAGE, ctx)
    return DistillOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        student="compressed" if params.student == "compressed" else params.student.arch,
        val_metric=val_metric(model, splits),
        method=method,
        input_val_metric=input_val,
    )
