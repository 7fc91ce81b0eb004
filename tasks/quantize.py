"""quantize: quantize the pruned model by the chosen method (zeros stay zeros)."""

from __future__ import annotations

from schemas.outputs import QuantizeOutput
from schemas.params import QuantizeParams
from shrinkflow.artifacts import load_model, save_model
from shrinkflow.measure import model_file
from shrinkflow.quantization import QUANTIZERS
from tasks import Context
from tasks._common import load_upstream, pass_through

STAGE = "quantize"


def run(params: QuantizeParams, ctx: Context) -> QuantizeOutput:
    path = ctx.paths.model(STAGE)
    if params.enabled:
        model, header = load_upstream(STAGE, ctx)
        qmodel, entry = QUANTIZERS[params.method](model, params)
        save_model(qmodel, path, header.with_transform(entry.pop("kind"), **entry))
    else:
        pass_through(STAGE, ctx)
    model, header = load_model(path)
    return QuantizeOutput(
        enabled=params.enabled,
        model=model_file(path, model, header, ctx.paths.root),
        method=params.method if params.enabled else "none",
    )
