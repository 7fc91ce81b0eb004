"""distill: train under the teacher's soft targets.

``student: compressed`` continues training the quantize output: its float
equivalent is trained with its zeros kept, then quantized again the same way, so
the result is the same small model with recovered accuracy. A model spec trains a
new student from the teacher instead.
"""

from __future__ import annotations

from schemas.outputs import DistillOutput
from schemas.params import DistillParams
from shrinkflow.artifacts import ModelHeader, from_float, keep_constraints, load_model, save_model, to_float
from shrinkflow.data import load_splits
from shrinkflow.distillation import DISTILL_LOSSES, resolve_method
from shrinkflow.errors import ParamsError
from shrinkflow.measure import model_file
from shrinkflow.training import fit, predict, resolve_device, seed_everything
from tasks import Context
from tasks._common import load_upstream, pass_through, val_metric

STAGE = "distill"


def run(params: DistillParams, ctx: Context) -> DistillOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits)
    if params.enabled:
        method = resolve_method(params.method, splits.task)
        if method == "logits" and splits.task != "classification":
            raise ParamsError("distill.method 'logits' needs class labels but the data is a regression task: use 'regression' or 'auto'")
        seed_everything(ctx.seed)
        teacher, _ = load_model(ctx.paths.model("train_teacher"))
        teacher_out = predict(teacher, splits.tensors("train")[0])
        after_step = None
        if params.student == "compressed":
            compressed, header = load_upstream(STAGE, ctx)
            student = to_float(compressed, header)
            after_step = keep_constraints(student, header)
        else:
            header = ModelHeader(
                spec=params.student.model_dump(mode="json", by_alias=True),
                input_shape=splits.input_shape,
                out_features=splits.out_features,
                task=splits.task,
            )
            student = header.build()
        fit(
            student, splits, epochs=params.epochs, batch_size=params.batch_size, optimizer=params.optimizer,
            seed=ctx.seed, device=resolve_device(ctx.device), where=STAGE,
            loss_fn=DISTILL_LOSSES[method](params.temperature, params.alpha),
            extra_targets=[teacher_out], after_step=after_step, live_dir=ctx.paths.live(STAGE),
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
    )
