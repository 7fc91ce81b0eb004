"""evaluate: every variant side by side, each loaded from the file whose size is reported."""

from __future__ import annotations

import os

import torch

from schemas.metrics import Metrics, VariantMetrics
from schemas.outputs import EvaluateOutput, GateResult
from schemas.params import EvaluateParams
from schemas.paths import VARIANTS
from shrinkflow.data import load_splits
from shrinkflow.io import write_json, write_text
from shrinkflow.loading import load_model
from shrinkflow.measure import cpu_model, latencies_ms, macs, model_file, sparsity_of
from shrinkflow.packing import pack_model, render
from shrinkflow.report import quality_drop, render_table
from shrinkflow.training import predict, quality
from tasks import Context
from tasks._common import load

FINAL = "student"


def _gates(params: EvaluateParams, metrics: Metrics, task: str) -> list[GateResult]:
    teacher, final = metrics["teacher"], metrics[FINAL]
    g = params.gates
    out: list[GateResult] = []
    if g.max_accuracy_drop is not None and task == "classification":
        drop = quality_drop(teacher.accuracy, final.accuracy, "accuracy")
        out.append(GateResult(name="max_accuracy_drop", limit=g.max_accuracy_drop, value=drop, passed=drop <= g.max_accuracy_drop))
    if g.max_mse_ratio is not None and task == "regression":
        ratio = final.mse / max(teacher.mse, 1e-12)
        out.append(GateResult(name="max_mse_ratio", limit=g.max_mse_ratio, value=ratio, passed=ratio <= g.max_mse_ratio))
    if g.min_compression_ratio is not None:
        r = final.compression_ratio
        out.append(GateResult(name="min_compression_ratio", limit=g.min_compression_ratio, value=r, passed=r >= g.min_compression_ratio))
    if g.max_latency_ms is not None:
        b = min(params.batch_sizes)
        ms = final.latency_ms(b)
        out.append(GateResult(name=f"max_latency_ms_b{b}", limit=g.max_latency_ms, value=ms, passed=ms <= g.max_latency_ms))
    return out


def _pack_variant(variant: str, model, header, unpacked, ctx: Context, reference: torch.Tensor | None):
    """Pack ``variant`` to models/evaluate/<variant>.sfz and reload it from there.

    ``reference``: inputs whose predictions the file must keep (float16 where it does), None = lossless.
    Returns the loaded model, its header, the packed file's description and the
    pack summary (also written to models/evaluate/pack.json).
    """
    path = ctx.paths.packed(variant)
    rep = pack_model(model, header, path, reference=reference)
    loaded, header = load_model(path, ctx.trusted)
    summary = {
        "variant": variant,
        "path": ctx.paths.rel(path),
        "size_bytes": rep.size_bytes,
        "unpacked_path": unpacked.path,
        "unpacked_size_bytes": unpacked.size_bytes,
        "format_version": rep.version,
        "breakdown": rep.breakdown,
        "rounded": rep.rounded,
        "checked": rep.checked,
        "tensors": rep.tensors,
    }
    write_json(ctx.paths.pack_summary, summary)
    described = model_file(path, loaded, header, ctx.paths.root)
    described = described.model_copy(update={"format": f"packed .sfz ({described.format})"})
    return loaded, header, described, summary


def _reference(splits) -> torch.Tensor:
    """The inputs whose predictions a packed file keeps: the validation split (the training split without one).

    Never the test split: it measures the file, it does not choose how the file is made.
    """
    X, _ = splits.tensors("val")
    return X if len(X) else splits.tensors("train")[0]


def _packed_lines(packed: dict | None) -> list[str]:
    """Report section: the packed file's size and where its bytes go."""
    if packed is None:
        return []
    total = packed["size_bytes"]
    if packed["checked"]:
        precision = (
            f"Stored as float16 because every predicted class on the {packed['checked']:,} validation examples stayed "
            f"the same: {', '.join(packed['rounded']) or 'none'}; every other value is exact."
        )
    else:
        precision = "Every value is stored exactly (lossless)."
    return [
        f"## Packed file (`{packed['variant']}`)",
        "",
        f"`{packed['path']}`: {total:,} bytes (the `.pt` file: {packed['unpacked_size_bytes']:,} bytes, "
        f"{packed['unpacked_size_bytes'] / total:.1f}× larger). The `{packed['variant']}` row above is measured from it. "
        + precision,
        "",
        *render(total, packed["breakdown"], packed["tensors"]),
        "",
    ]


def run(params: EvaluateParams, ctx: Context) -> EvaluateOutput:
    splits = load_splits(ctx.paths.splits)
    X, y = splits.tensors("test")
    task = splits.task
    qkey = "accuracy" if task == "classification" else "mse"
    models, files, structure = {}, {}, {}
    packed: dict | None = None
    for stage, variant in VARIANTS.items():
        path = ctx.paths.model(stage)
        models[variant], header = load(stage, ctx)
        files[variant] = model_file(path, models[variant], header, ctx.paths.root)
        if variant == params.pack:
            reference = _reference(splits) if params.pack_precision == "predictions" else None
            models[variant], header, files[variant], packed = _pack_variant(
                variant, models[variant], header, files[variant], ctx, reference
            )
        structure[variant] = {"sparsity": sparsity_of(models[variant], header), "macs": macs(models[variant], header)}
    if packed is None:  # models/evaluate is a DVC out: say why it holds no packed file
        write_json(ctx.paths.pack_summary, {"variant": None, "reason": f"evaluate.pack: {params.pack}"})
    outputs = {v: predict(m, X) for v, m in models.items()}
    lat = latencies_ms(models, X, params.batch_sizes, threads=params.threads, min_run_time=params.min_run_time)
    rows: dict[str, VariantMetrics] = {}
    t = "teacher"
    for v, out in outputs.items():
        agreement = (
            float((out.argmax(1) == outputs[t].argmax(1)).float().mean())
            if task == "classification"
            else float(torch.nn.functional.mse_loss(out, outputs[t]))
        )
        m = {
            qkey: quality(out, y, task),
            "agreement": agreement,
            "size_bytes": files[v].size_bytes,
            "params": files[v].params,
            "nonzero_params": files[v].nonzero_params,
            "sparsity": structure[v]["sparsity"][0],
            "layer_sparsity": structure[v]["sparsity"][1],
            "macs": structure[v]["macs"],
            "format": files[v].format,
            "path": files[v].path,
        }
        for b in params.batch_sizes:
            m[f"latency_ms_b{b}"] = lat[v][b]
        m["compression_ratio"] = files[t].size_bytes / files[v].size_bytes
        for b in params.batch_sizes:
            m[f"speedup_b{b}"] = lat[t][b] / lat[v][b]
        rows[v] = VariantMetrics(**m)
    metrics = Metrics(rows)
    write_json(ctx.paths.metrics, metrics.as_json())
    write_json(
        ctx.paths.variants_plot,
        [{"variant": v, "size_bytes": m.size_bytes, "quality": m.quality, "metric": qkey} for v, m in metrics.items()],
    )
    gates = _gates(params, metrics, task)
    host = f"{cpu_model()}, torch {torch.__version__}, {params.threads} thread(s), {os.cpu_count()} CPUs"
    gate_lines = [f"- {g.name}: {g.value:.4g} (limit {g.limit:g}) — {'pass' if g.passed else 'FAIL'}" for g in gates] or ["- none configured"]
    report = "\n".join(
        [
            "# shrinkflow report",
            "",
            f"Test split: {len(X)} examples ({task}). Sizes are the model files on disk; each variant's "
            "quality is measured by loading that file. Latency: median ms on CPU "
            f"({host}); ratios are against the teacher in the same run.",
            "",
            render_table(metrics),
            "",
            *_packed_lines(packed),
            f"## Gates (on the final model, `{FINAL}`)",
            *gate_lines,
            "",
        ]
    )
    write_text(ctx.paths.report, report)
    return EvaluateOutput(
        metrics=ctx.paths.rel(ctx.paths.metrics),
        report=ctx.paths.rel(ctx.paths.report),
        final_variant=FINAL,
        gates=gates,
        passed=all(g.passed for g in gates),
    )
