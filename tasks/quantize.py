"""quantize: quantize the pruned model by the chosen method (zeros stay zeros)."""

from __future__ import annotations

from schemas.outputs import QuantizeOutput
from schemas.params import QuantizeParams
from shrinkflow.artifacts import save_model, to_float
from shrinkflow.data import load_splits
from shrinkflow.errors import ShrinkflowError
from shrinkflow.masks import masks_from_zeros
from shrinkflow.measure import model_file, sparsity_of
from shrinkflow.quantization import QUANTIZERS
from shrinkflow.training import seed_everything
from tasks import Context
from tasks._common import load, load_upstream, method_env, pass_through, val_metric

STAGE = "quantize"


def run(params: QuantizeParams, ctx: Context) -> QuantizeOutput:
    path = ctx.paths.model(STAGE)
    splits = load_splits(ctx.paths.splits) if ctx.paths.splits.is_file() else None
    if params.enabled:
        seed_everything(ctx.seed)
        model, header = load_upstream(STAGE, ctx)
        kept = masks_from_zeros(to_float(model, header))
        # No per-epoch curves: most methods do not train, and DVC would then miss a
        # declared curves folder.
        finetune = getattr(params, "finetune", None)
        with method_env(STAGE, ctx, splits, teacher=bool(finetune and finetune.epochs and finetune.distill_from_teacher)) as env:
            qmodel, header = QUANTIZERS[params.method](model, header, params, env)
        notes = env.notes
        save_model(qmodel, path, header)
    else:
        notes = {}
        pass_through(STAGE, ctx)
    model, header = load(STAGE, ctx)
    shared = [t["layers"] for t in header.transforms if t["kind"] == "kmeans"]
    total, _ = sparsity_of(model, header)
    if params.enabled:
        after = masks_from_zeros(to_float(model, header))
        lost = sum(int((~m & after[k]).sum()) for k, m in kept.items())
        if lost:  # a quantizer must never fill in pruned weights
            raise ShrinkflowError(f"quantize.method {params.method} turned {lost} pruned zeros into non-zero weights")
    return QuantizeOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        method=params.method if params.enabled else "none",
        sparsity=total,
        val_metric=val_metric(model, splits) if splits is not None else None,
        bits=shared[-1] if shared else None,
        bit_sensitivity=notes.get("bit_sensitivity"),
    )
