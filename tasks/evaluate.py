"""evaluate: every variant side by side, each loaded from the file whose size is reported."""

from __future__ import annotations

import os
import platform

import torch

from schemas.outputs import EvaluateOutput, GateResult
from schemas.params import EvaluateParams
from shrinkflow.artifacts import load_model
from shrinkflow.data import load_splits
from shrinkflow.io import write_json, write_text
from shrinkflow.measure import latencies_ms, model_file
from shrinkflow.paths import VARIANTS
from shrinkflow.training import predict, quality
from tasks import Context

FINAL = "student"


def _gates(params: EvaluateParams, metrics: dict[str, dict], task: str) -> list[GateResult]:
    teacher, final = metrics["teacher"], metrics[FINAL]
    g = params.gates
    out: list[GateResult] = []
    if g.max_accuracy_drop is not None and task == "classification":
        drop = teacher["accuracy"] - final["accuracy"]
        out.append(GateResult(name="max_accuracy_drop", limit=g.max_accuracy_drop, value=drop, passed=drop <= g.max_accuracy_drop))
    if g.max_mse_ratio is not None and task == "regression":
        ratio = final["mse"] / max(teacher["mse"], 1e-12)
        out.append(GateResult(name="max_mse_ratio", limit=g.max_mse_ratio, value=ratio, passed=ratio <= g.max_mse_ratio))
    if g.min_compression_ratio is not None:
        r = final["compression_ratio"]
        out.append(GateResult(name="min_compression_ratio", limit=g.min_compression_ratio, value=r, passed=r >= g.min_compression_ratio))
    return out


def render_table(metrics: dict[str, dict]) -> str:
    """A markdown table of metrics.json (also printed by ``shrinkflow metrics``)."""
    first = next(iter(metrics.values()))
    quality_key = "accuracy" if "accuracy" in first else "mse"
    batch_sizes = sorted(int(k.removeprefix("latency_ms_b")) for k in first if k.startswith("latency_ms_b"))
    cols = [quality_key, "agreement", "size_bytes", "compression_ratio", "params", "nonzero_params"]
    for b in batch_sizes:
        cols += [f"latency_ms_b{b}", f"speedup_b{b}"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in metrics.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(params: EvaluateParams, ctx: Context) -> EvaluateOutput:
    splits = load_splits(ctx.paths.splits)
    X, y = splits.tensors("test")
    task = splits.task
    qkey = "accuracy" if task == "classification" else "mse"
    models, files = {}, {}
    for stage, variant in VARIANTS.items():
        path = ctx.paths.model(stage)
        models[variant], header = load_model(path)
        files[variant] = model_file(path, models[variant], header, ctx.paths.root)
    outputs = {v: predict(m, X) for v, m in models.items()}
    lat = latencies_ms(models, X, params.batch_sizes, threads=params.threads, min_run_time=params.min_run_time)
    metrics: dict[str, dict] = {}
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
            "format": files[v].format,
            "path": files[v].path,
        }
        for b in params.batch_sizes:
            m[f"latency_ms_b{b}"] = lat[v][b]
        m["compression_ratio"] = files[t].size_bytes / files[v].size_bytes
        for b in params.batch_sizes:
            m[f"speedup_b{b}"] = lat[t][b] / lat[v][b]
        metrics[v] = m
    write_json(ctx.paths.metrics, metrics)
    write_json(
        ctx.paths.variants_plot,
        [{"variant": v, "size_bytes": m["size_bytes"], "quality": m[qkey], "metric": qkey} for v, m in metrics.items()],
    )
    gates = _gates(params, metrics, task)
    host = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {params.threads} thread(s), {os.cpu_count()} CPUs"
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
