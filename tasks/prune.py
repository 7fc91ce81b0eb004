"""prune: zero weights by the chosen method, then fine-tune with the zeros kept."""

from __future__ import annotations

from schemas.outputs import PruneOutput
from schemas.params import PruneParams
from shrinkflow.artifacts import load_model, save_model
from shrinkflow.data import load_splits
from shrinkflow.measure import model_file
from shrinkflow.pruning import PRUNERS, keep_masked, sparsity
from shrinkflow.training import fit, resolve_device, seed_everything
from tasks import Context
from tasks._common import load_upstream, pass_through, val_metric

STAGE = "prune"


def run(params: PruneParams, ctx: Context) -> PruneOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits)
    if params.enabled:
        seed_everything(ctx.seed)
        model, header = load_upstream(STAGE, ctx)
        masks = PRUNERS[params.method](model, params)
        if params.finetune.epochs:
            fit(
                model, splits, epochs=params.finetune.epochs, batch_size=params.finetune.batch_size,
                optimizer=params.finetune.optimizer, seed=ctx.seed, device=resolve_device(ctx.device),
                where=f"{STAGE}.finetune", after_step=keep_masked(masks), live_dir=ctx.paths.live(STAGE),
            )
        save_model(model, path, header.model_copy(update={"masked": True}))
    else:
        pass_through(STAGE, ctx)
    model, header = load_model(path)
    total, per_layer = sparsity(model)
    return PruneOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        sparsity=total,
        layer_sparsity=per_layer,
        val_metric=val_metric(model, splits),
    )
