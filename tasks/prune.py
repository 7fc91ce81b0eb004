"""prune: remove weights (or whole neurons/channels) by the chosen method and schedule.

Unstructured methods keep the architecture and zero weights (kept at zero through
fine-tuning); the file is written with the ``sparse`` storage so it shrinks with
sparsity. ``structured`` shrinks the layers and records how in the file's header.
"""

from __future__ import annotations

import math

from schemas.outputs import PruneOutput
from schemas.params import PruneParams
from schemas.prune import MagnitudePrune, RandomPrune
from shrinkflow.artifacts import load_model, save_model
from shrinkflow.data import Splits, load_splits
from shrinkflow.distillation import logits_loss, regression_loss
from shrinkflow.measure import macs, model_file
from shrinkflow.models import count_params
from shrinkflow.pruning import prunable, sparsity
from shrinkflow.pruning import sensitivity as sens
from shrinkflow.pruning.magnitude import layer_name, layer_targets
from shrinkflow.pruning.schedule import run_schedule
from shrinkflow.pruning.storage import NAME as SPARSE
from shrinkflow.training import fit, resolve_device, seed_everything, teacher_outputs
from tasks import Context
from tasks._common import load_upstream, pass_through, val_metric

STAGE = "prune"


def _finetuner(params: PruneParams, splits: Splits, ctx: Context):
    """``finetune(model, epochs, after_step)`` with the section's optimizer, and the teacher's soft targets if asked."""
    ft = params.finetune
    loss_fn, extra = None, []
    if ft.distill_from_teacher:
        teacher, _ = load_model(ctx.paths.model("train_teacher"))
        extra = [teacher_outputs(teacher, splits.tensors("train")[0], ctx.paths.teacher_outputs)]
        loss_fn = (
            logits_loss(ft.temperature, ft.alpha) if splits.task == "classification" else regression_loss(alpha=ft.alpha)
        )

    def finetune(model, epochs, after_step):
        return fit(
            model, splits, epochs=epochs, batch_size=ft.batch_size, optimizer=ft.optimizer, seed=ctx.seed,
            device=resolve_device(ctx.device), where=f"{STAGE}.finetune", loss_fn=loss_fn, extra_targets=extra,
            after_step=after_step, live_dir=ctx.paths.live(STAGE),
        )

    return finetune


def _auto_layers(params: PruneParams, table: dict, model) -> dict[str, float]:
    """``layers`` with the sensitivity-based allocation for every layer the user left to ``sparsity``."""
    names = [layer_name(k) for k in prunable(model)]
    _, pool = layer_targets(names, params.model_copy(update={"scope": "global"}))
    if not pool:
        return dict(params.layers)
    allocated = sens.auto_allocate(table, params.sparsity, pool)
    # The user's own patterns come last so they win over the allocation.
    return {**allocated, **params.layers}


def run(params: PruneParams, ctx: Context) -> PruneOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits)
    extra: dict = {}
    if params.enabled:
        seed_everything(ctx.seed)
        model, header = load_upstream(STAGE, ctx)
        extra["teacher_params"] = count_params(model)[0]
        extra["teacher_macs"] = macs(model, header)
        table = None
        auto = isinstance(params, MagnitudePrune | RandomPrune) and params.allocation == "auto"
        if params.sensitivity or auto:
            table = sens.analyze(model, splits, list(params.sensitivity_sparsities))
            seed_everything(ctx.seed)
        if table is not None and params.sensitivity:
            sens.write_reports(table, ctx.paths.sensitivity)
            extra["sensitivity"] = ctx.paths.rel(ctx.paths.sensitivity / sens.MARKDOWN)
        else:
            sens.write_disabled(ctx.paths.sensitivity)
        if auto:
            layers = _auto_layers(params, table, model)
            params = params.model_copy(update={"layers": layers})
            extra["allocation"] = layers
        steps_per_epoch = math.ceil(len(splits.tensors("train")[0]) / params.finetune.batch_size)
        result = run_schedule(model, params, header.input_shape, _finetuner(params, splits, ctx), steps_per_epoch)
        for entry in result.transforms:
            header = header.with_transform(**entry)
        header = header.model_copy(update={"masked": header.masked or bool(result.masks), "storage": SPARSE})
        save_model(result.model, path, header)
        extra.update(method=params.method, schedule=params.schedule)
    else:
        pass_through(STAGE, ctx)
        sens.write_disabled(ctx.paths.sensitivity)
    model, header = load_model(path)
    total, per_layer = sparsity(model)
    return PruneOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        sparsity=total,
        layer_sparsity=per_layer,
        val_metric=val_metric(model, splits),
        macs=macs(model, header),
        **extra,
    )
