"""prune: remove weights (or whole neurons/channels) by the chosen method and schedule.

Unstructured methods (magnitude, random, variational) keep the architecture and zero
weights (kept at zero through fine-tuning); the file is written with the ``sparse``
storage so it shrinks with sparsity. ``structured`` shrinks the layers and records
how in the file's header; so does the removal of units left without weights
(``prune.dead_units``).
"""

from __future__ import annotations

from schemas.outputs import PruneOutput
from schemas.params import PruneParams
from schemas.prune import MagnitudePrune, RandomPrune
from shrinkflow import sensitivity as sens
from shrinkflow.artifacts import save_model
from shrinkflow.data import load_splits
from shrinkflow.masks import prunable, sparsity
from shrinkflow.measure import macs, model_file
from shrinkflow.models import count_params
from shrinkflow.pruning import PRUNERS, remove_dead_units
from shrinkflow.pruning.magnitude import layer_name, layer_targets
from shrinkflow.training import seed_everything
from tasks import Context
from tasks._common import load, load_upstream, method_env, no_curves, pass_through, val_metric

STAGE = "prune"


def _auto_layers(params: PruneParams, table: dict, model) -> dict[str, float]:
    """``layers`` with the sensitivity-based allocation for every layer the user left to ``sparsity``."""
    names = [layer_name(k) for k in prunable(model)]
    _, pool = layer_targets(names, params.model_copy(update={"scope": "global"}))
    if not pool:
        return dict(params.layers)
    allocated = sens.auto_allocate(table, params.sparsity, pool)
    # The user's own patterns come last so they win over the allocation.
    return {**allocated, **params.layers}


def _probe(splits):
    """Inputs on which dead-unit removal checks that the outputs stay: a few hundred training examples."""
    return splits.tensors("train")[0][:256]


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
        with method_env(STAGE, ctx, splits, teacher=params.finetune.distill_from_teacher, curves=True) as env:
            model, header = PRUNERS[params.method](model, header, params, env)
        if params.dead_units:
            model, header, removed = remove_dead_units(model, header, _probe(splits))
            extra["dead_units"] = removed
        save_model(model, path, header)
        extra.update(method=params.method, schedule=getattr(params, "schedule", None))
    else:
        pass_through(STAGE, ctx)
        no_curves(STAGE, ctx)
        sens.write_disabled(ctx.paths.sensitivity)
    model, header = load(STAGE, ctx)
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
