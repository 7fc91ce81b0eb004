"""evaluate: every variant side by side, each loaded from the file whose size is reported."""

from __future__ import annotations

import logging
import os
import posixpath

import torch

from schemas.changes import Chance, ChangesReport
from schemas.metrics import Metrics, VariantMetrics
from schemas.outputs import EvaluateOutput, GateResult
from schemas.params import EvaluateParams
from schemas.paths import VARIANTS
from shrinkflow import changes
from shrinkflow.data import load_splits
from shrinkflow.errors import ParamsError
from shrinkflow.io import write_json, write_text
from shrinkflow.loading import load_model
from shrinkflow.measure import RUNTIMES, compiled, cpu_model, latencies_ms, macs, model_file, runtime_for, sparsity_of
from shrinkflow.packing import pack_model, render
from shrinkflow.report import quality_drop, render_table
from shrinkflow.training import predict, quality
from tasks import Context
from tasks._common import load

FINAL = "student"

log = logging.getLogger("shrinkflow")


def _chance_gate(chance: Chance) -> GateResult:
    """Always on: against a teacher no better than chance, every drop reads as zero and passes."""
    sign = "+" if chance.metric == "accuracy" else "-"
    detail = f"chance {chance.metric} {chance.baseline:.4g} ({chance.detail}) {sign} 2.33 standard errors"
    if not chance.passed:
        detail = f"the teacher is no better than chance: {detail}; check train_teacher (optimizer.lr, epochs, model) and the data"
    return GateResult(name="teacher_above_chance", limit=chance.limit, value=chance.teacher, passed=chance.passed, detail=detail)


def _gates(
    params: EvaluateParams, metrics: Metrics, task: str, chance: Chance | None = None, report: ChangesReport | None = None
) -> list[GateResult]:
    teacher, final = metrics["teacher"], metrics[FINAL]
    g = params.gates
    out: list[GateResult] = [_chance_gate(chance)] if chance is not None else []
    if g.min_accuracy is not None and task == "classification":
        for v, m in metrics.items():
            out.append(GateResult(name=f"min_accuracy_{v}", limit=g.min_accuracy, value=m.accuracy, passed=m.accuracy >= g.min_accuracy))
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
    if g.max_class_drop is not None and task == "classification" and final.worst_class_drop is not None:
        drop, detail = final.worst_class_drop, None
        c = report.variants[FINAL] if report is not None else None
        if c is not None and c.worst_class is not None:
            row = c.per_class[c.worst_class]
            detail = f"class {report.name(row.label)}: {row.teacher_accuracy:.2%} → {row.accuracy:.2%} of {row.n} test inputs"
        out.append(GateResult(name="max_class_drop", limit=g.max_class_drop, value=drop, passed=drop <= g.max_class_drop, detail=detail))
    if g.max_ece_increase is not None and task == "classification" and final.ece is not None and teacher.ece is not None:
        inc = final.ece - teacher.ece
        out.append(GateResult(
            name="max_ece_increase", limit=g.max_ece_increase, value=inc, passed=inc <= g.max_ece_increase,
            detail=f"ECE {teacher.ece:.2%} (teacher) → {final.ece:.2%} ({FINAL})",
        ))
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


def _bits_lines(headers: dict) -> list[str]:
    """Report section: the k-means bit width of every shared layer, per variant that has them."""
    rows = []
    for variant, header in headers.items():
        shared = [t["layers"] for t in header.transforms if t["kind"] == "kmeans"]
        if shared:
            rows.append(f"- `{variant}`: " + ", ".join(f"{layer} {bits} bits" for layer, bits in shared[-1].items()))
    return ["## k-means bit widths", "", *rows, ""] if rows else []


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
    models, files, structure, headers = {}, {}, {}, {}
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
        headers[variant] = header
    if packed is None:  # models/evaluate is a DVC out: say why it holds no packed file
        write_json(ctx.paths.pack_summary, {"variant": None, "reason": f"evaluate.pack: {params.pack}"})
    outputs = {v: predict(m, X) for v, m in models.items()}
    changed = changes.analyze(outputs, y, task, reference="teacher", examples=params.changed_examples, classes=splits.classes)
    runtime = runtime_for(models, params.runtime)
    runners = {v: compiled(m) for v, m in models.items()} if runtime == "compile" else models
    try:
        lat = latencies_ms(runners, X, params.batch_sizes, threads=params.threads, min_run_time=params.min_run_time)
    except Exception as exc:  # torch.compile names what it cannot compile
        if runtime != "compile":
            raise
        raise ParamsError(
            f"evaluate.runtime: torch.compile failed on a variant ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "set evaluate.runtime: eager"
        ) from exc
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
            "runtime": RUNTIMES[runtime],
        }
        for b in params.batch_sizes:
            m[f"latency_ms_b{b}"] = lat[v][b]
        m["compression_ratio"] = files[t].size_bytes / files[v].size_bytes
        for b in params.batch_sizes:
            m[f"speedup_b{b}"] = lat[t][b] / lat[v][b]
        c = changed.variants[v]
        if c.task == "classification":
            m.update(ece=c.ece, newly_wrong=c.newly_wrong, newly_right=c.newly_right, worst_class_drop=c.worst_class_drop)
        rows[v] = VariantMetrics(**m)
    metrics = Metrics(rows)
    write_json(ctx.paths.metrics, metrics.as_json())
    write_json(
        ctx.paths.variants_plot,
        [{"variant": v, "size_bytes": m.size_bytes, "quality": m.quality, "metric": qkey} for v, m in metrics.items()],
    )
    changed = changes.write_reports(changed, outputs, y, X, ctx.paths.changes, ctx.paths.root)
    gates = _gates(params, metrics, task, changed.chance, changed)
    for g in gates:
        if not g.passed:
            log.warning("gate %s failed: %.4g (limit %.4g)%s", g.name, g.value, g.limit, f": {g.detail}" if g.detail else "")
    host = f"{RUNTIMES[runtime]}, {cpu_model()}, torch {torch.__version__}, {params.threads} thread(s), {os.cpu_count()} CPUs"
    gate_lines = [
        f"- {g.name}: {g.value:.4g} (limit {g.limit:.4g}) — {'pass' if g.passed else 'FAIL'}" + (f" ({g.detail})" if g.detail else "")
        for g in gates
    ]
    here = ctx.paths.rel(ctx.paths.report.parent)
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
            *_bits_lines(headers),
            f"## Gates (on the final model, `{FINAL}`, and the teacher against chance)",
            *gate_lines,
            "",
            changes.render_summary(changed, link=lambda p: posixpath.relpath(p, here)),
            "",
            f"Details per variant: `shrinkflow changes VARIANT`; everything in {ctx.paths.rel(ctx.paths.changes_json)}.",
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
