"""distill: train under the teacher's soft targets.

``student: compressed`` continues training the quantize output: its float
equivalent is trained with its zeros and its quantization constraints kept
(``artifacts.keep_constraints``), then quantized again the same way
(``artifacts.from_float``), so the result is the same small model with recovered
accuracy. A model spec trains a new student from the teacher instead.
"""

from __future__ import annotations

from schemas.distill import DistillParams
from schemas.outputs import DistillOutput
from shrinkflow.artifacts import ModelHeader, from_float, keep_constraints, load_model, save_model, to_float
from shrinkflow.data import load_splits
from shrinkflow.distillation import check_method, distill
from shrinkflow.errors import InputError
from shrinkflow.measure import model_file
from shrinkflow.training import resolve_device, seed_everything, teacher_outputs
from tasks import Context
from tasks._common import load_upstream, pass_through, val_metric

STAGE = "distill"


def run(params: DistillParams, ctx: Context) -> DistillOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits)
    method = None
    input_val = None
    if params.enabled:
        method = check_method(params.method, splits.task)
        seed_everything(ctx.seed)
        teacher, _ = load_model(ctx.paths.model("train_teacher"))
        after_step = None
        if params.student == "compressed":
            compressed, header = load_upstream(STAGE, ctx)
            input_val = val_metric(compressed, splits)
            student = to_float(compressed, header)
            after_step = keep_constraints(student, header)
        else:
            header = ModelHeader.for_data(params.student, splits)
            try:
                student = header.build()
            except ValueError as exc:
                raise InputError(f"distill.student: {exc}") from exc
        distill(
            student, teacher, splits, params, seed=ctx.seed, device=resolve_device(ctx.device),
            after_step=after_step, live_dir=ctx.paths.live(STAGE), where=STAGE,
            teacher_out=teacher_outputs(teacher, splits.tensors("train")[0], ctx.paths.teacher_outputs),
        )
        save_model(from_float(student, header), path, header)
    else:
        pass_through(STAGE, ctx)
    model, header = load_model(path)
    return DistillOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        student="compressed" if params.student == "compressed" else params.student.arch,
        val_metric=val_metric(model, splits),
        method=method,
        input_val_metric=input_val,
    )
