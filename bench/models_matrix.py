"""The compatibility matrix of docs/models.md: every method on every model family, measured or refused.

    .venv/bin/python bench/models_matrix.py [--families mobilenet lstm gru transformer] [--mnist PATH --train-limit N]
        [--doc docs/models.md] [--out bench/results/models_matrix.json]

For each family, its preset (``examples/mnist-<family>/params.yaml``) is the base;
by default it runs on sklearn's digits (1×8×8, the whole matrix in minutes; the
transformer's patch then follows the image, 2×2) with a digits-sized budget, or on
MNIST with ``--mnist``. In a scratch project, through the stages' own entry point
(``tasks.run.run_stage``, what ``shrinkflow stage`` runs): the data and the teacher
once, then for every cell its prune / quantize / distill stages and evaluate.
A cell's figures are the evaluate stage's row for the variant the method made:
whole-file size ratio against the teacher's fp32 file, and the accuracy drop in
percentage points, each measured from the file on disk. A method that refuses
says so before training; its exact message goes into the document.

Cells: prune magnitude / random / structured / variational (the pruned file), quantize dynamic /
static / qat / kmeans on the teacher (the quantized file), distill a new student
of the same family at half width (teacher's budget), distill the compressed model
(structured + the family's quantizer: the packed .sfz student), and ONNX export of
the teacher and of the int8 variant (onnxruntime parity).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.metrics import Metrics  # noqa: E402
from schemas.paths import StagePaths  # noqa: E402
from shrinkflow.config import load_params  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402

FAMILIES = ["mobilenet", "lstm", "gru", "transformer"]
#: column → (title, the params that make the cell, the variant whose row it reads)
CELLS: dict[str, tuple[str, list[str], str]] = {
    "magnitude": ("prune magnitude 80 %", ["prune={method: magnitude, sparsity: 0.8}"], "pruned"),
    "random": ("prune random 50 %", ["prune={method: random, sparsity: 0.5}"], "pruned"),
    "structured": ("prune structured 50 %", ["prune={method: structured, sparsity: 0.5}"], "pruned"),
    "variational": ("prune variational (10 epochs)",
                    ["prune={method: variational, finetune: {epochs: 10, batch_size: 100, optimizer: {name: adam, lr: 0.003}}}"],
                    "pruned"),
    "dynamic": ("dynamic int8", ["prune.enabled=false", "quantize={method: dynamic}"], "quantized"),
    "static": ("static int8", ["prune.enabled=false", "quantize={method: static}"], "quantized"),
    "qat": ("QAT int8", ["prune.enabled=false", "quantize={method: qat}"], "quantized"),
    "kmeans": ("k-means 4-bit", ["prune.enabled=false", "quantize={method: kmeans, bits: 4}"], "quantized"),
    "distill-new": ("distill: new student, half width", ["prune.enabled=false", "quantize.enabled=false"], "student"),
    "distill-compressed": ("distill: compressed student (packed .sfz)", [], "student"),
}
#: The family's half-width student (distill-new) and its compressed student's quantizer.
HALF = {
    "mobilenet": "{arch: mobilenet, widths: [8, 16, 32], blocks: 2, expansion: 2}",
    "lstm": "{arch: lstm, hidden: 64}",
    "gru": "{arch: gru, hidden: 64}",
    "transformer": "{arch: transformer, dim: 32, depth: 2, heads: 2, mlp: 64}",
}
QUANTIZER = {"mobilenet": "static", "lstm": "dynamic", "gru": "dynamic", "transformer": "static"}
#: A digits-sized budget (1,257 training images): the presets' are sized for MNIST.
DIGITS = ["data={source: digits}", "train_teacher.epochs=30", "prune.finetune.epochs=3", "distill.epochs=3"]
COMMON = ["evaluate.batch_sizes=[1]", "evaluate.min_run_time=0.05", "evaluate.runtime=eager", "evaluate.pack_precision=exact"]


def _project(dest: Path) -> Path:
    """A scratch project root: params.yaml and the data folder the stages expect."""
    (dest / "data" / "raw").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")
    return dest


def _params(root: Path, family: str, base: list[str], cell: list[str]) -> Any:
    preset = ROOT / "examples" / f"mnist-{family}" / "params.yaml"
    return load_params(preset, [*base, *COMMON, *cell], root=root)


def run_family(family: str, base: list[str], tmp: Path, only: list[str]) -> dict[str, Any]:
    from tasks.run import run_stage

    root = _project(tmp / family)
    params = _params(root, family, base, [])
    t0 = time.perf_counter()
    run_stage("data", params, root)
    run_stage("train_teacher", params.model_copy(update={"prune": params.prune.model_copy(update={"enabled": False}),
                                                          "quantize": params.quantize.model_copy(update={"enabled": False})}), root)
    teacher_seconds = time.perf_counter() - t0
    cells: dict[str, Any] = {}
    for name, (_, overrides, variant) in CELLS.items():
        if name not in only:
            continue
        extra = list(overrides)
        if name == "distill-new":  # the teacher's budget, a new student's default (the preset pins the recovery's)
            tt = params.train_teacher
            extra += [f"distill.student={HALF[family]}", f"distill.epochs={tt.epochs}", f"distill.batch_size={tt.batch_size}",
                      f"distill.optimizer={json.dumps(tt.optimizer.model_dump(mode='json'))}"]
        elif name == "distill-compressed":
            extra += ["prune={method: structured, sparsity: 0.5}", f"quantize={{method: {QUANTIZER[family]}}}", "distill.student=compressed"]
        else:
            extra.append("distill.enabled=false")
        p = _params(root, family, base, extra)
        t0 = time.perf_counter()
        try:
            for stage in ("prune", "quantize", "distill", "evaluate"):
                run_stage(stage, p, root)
        except ShrinkflowError as exc:
            cells[name] = {"works": False, "refusal": str(exc)}
            print(f"  {family} × {name}: refused: {exc}", flush=True)
            continue
        m = Metrics.read(root)
        row, teacher = m[variant], m["teacher"]
        cells[name] = {
            "works": True, "variant": variant, "format": row.format, "size_bytes": row.size_bytes,
            "size_ratio": row.compression_ratio, "accuracy": row.accuracy,
            "accuracy_drop_pp": 100 * (teacher.accuracy - row.accuracy), "seconds": round(time.perf_counter() - t0, 1),
        }
        if name == QUANTIZER[family]:
            cells["onnx"] = _onnx(root, p)
        print(f"  {family} × {name}: {row.compression_ratio:.2f}×, {cells[name]['accuracy_drop_pp']:+.2f} pp", flush=True)
    teacher_row = Metrics.read(root)["teacher"]
    return {"family": family, "teacher_accuracy": teacher_row.accuracy, "teacher_bytes": teacher_row.size_bytes,
            "teacher_seconds": round(teacher_seconds, 1), "cells": cells}


def _onnx(root: Path, params: Any) -> dict[str, Any]:
    """ONNX export of the teacher and the int8 variant, with onnxruntime parity on the test split."""
    from schemas.params import trusted
    from shrinkflow.data import load_splits
    from shrinkflow.export import check_onnx, export_onnx
    from shrinkflow.loading import load_model

    paths = StagePaths(root)
    X, y = load_splits(paths.splits).tensors("test")
    out = {}
    for variant, stage in (("teacher", "train_teacher"), ("int8", "quantize")):
        model, header = load_model(paths.model(stage), trusted(params))
        info = export_onnx(model, header, root / f"{variant}.onnx")
        res = check_onnx(info["path"], model, X, y, batch_sizes=(1,), min_run_time=0.02)
        out[variant] = {"exported_as": info["exported_as"], "max_abs_diff": res["max_abs_diff"],
                        "argmax_agreement": res["argmax_agreement"]}
    return out


def render(results: list[dict[str, Any]], data: str) -> str:
    """docs/models.md."""
    cols = [*CELLS, "onnx"]
    titles = {**{k: v[0] for k, v in CELLS.items()}, "onnx": "ONNX (onnxruntime parity)"}
    refusals: list[str] = []
    lines = [
        "# Model families × methods",
        "",
        "<!-- Generated by bench/models_matrix.py; tests/test_models_doc.py checks every cell's works/refuses against",
        "     tiny instances of each family. Do not edit by hand: rerun the script. -->",
        "",
        "Three families are built in (`train_teacher.model.arch`, see [params](params.md)); your own modules of these",
        "kinds (`arch: module`) go through the same code:",
        "",
        "- `mobilenet`: residual CNN of MobileNetV2 blocks (1×1 expand, 3×3 depthwise, 1×1 project, BatchNorm,",
        "  residual adds), global average pooling, Linear;",
        "- `lstm`, `gru`: one `nn.LSTM`/`nn.GRU` over the rows of an image (sequential MNIST: 28 steps of 28 pixels),",
        "  classified from the last step;",
        "- `transformer`: ViT on image patches: patch embedding, pre-norm blocks of multi-head self-attention",
        "  (one fused `qkv` Linear) and an MLP, LayerNorm, mean pooling, Linear.",
        "",
        "What each method does to them:",
        "",
        "- `magnitude`, `random`: every weight matrix, including LSTM/GRU `weight_ih`/`weight_hh` and the attention",
        "  projections (`qkv`, `proj`, or `nn.MultiheadAttention`'s `in_proj_weight`).",
        "- `structured`: Torch-Pruning removes channels (residual groups and depthwise layers follow their",
        "  producers) and attention heads (`qkv` outputs and `proj` inputs) plus MLP width; the embedding width of a",
        "  Transformer stays. LSTM/GRU hidden units are removed by our own pruner (Torch-Pruning 1.6's LSTM pruner",
        "  mis-slices the recurrent matrix and has no GRU) inside Torch-Pruning's dependency graph.",
        "- `variational`: learns which weights of the Linear and Conv layers to drop (the ViT's `qkv`, `proj` and MLP",
        "  included; BatchNorm statistics are recomputed afterwards). LSTM/GRU matrices and `nn.MultiheadAttention`'s",
        "  projections stay dense, so on the recurrent families only the classifier shrinks: use `magnitude` there.",
        "- `dynamic`: torch.ao int8 Linear, LSTM and GRU weights.",
        "- `static`, `qat`: `torch.export` + pt2e (`X86InductorQuantizer`): Conv and Linear in int8, BatchNorm",
        "  folded; forwards that branch on the input's shape are captured. Deployed compiled (`evaluate.runtime`).",
        "- `kmeans`: a 2**bits codebook per weight matrix, recurrent and attention ones included.",
        "- `distill`: a new student of the same family, or the compressed model (zeros and quantization kept).",
        "",
        f"Figures: {data}. Each cell is the evaluate stage's row for the file the method wrote: whole-file size ratio",
        "against the teacher's fp32 file, and accuracy drop in percentage points (negative: better than the teacher),",
        "measured by loading that file. A refusal happens before any training; its exact message is listed below.",
        "",
        "Columns: " + "; ".join(f"`{c}` = {titles[c]}" for c in cols) + ".",
        "",
        "| family | teacher accuracy | " + " | ".join(f"`{c}`" for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        cells = []
        for c in cols:
            cell = r["cells"].get(c)
            if cell is None:
                cells.append("—")
            elif c == "onnx":
                t, q = cell["teacher"], cell["int8"]
                how = "int8 QDQ" if "QDQ" in q["exported_as"] else "int8 (exported as its float equivalent)"
                cells.append(f"works: fp32 max Δ {t['max_abs_diff']:.1e}; {how} agreement {q['argmax_agreement']:.3f}")
            elif cell["works"]:
                cells.append(f"works: {cell['size_ratio']:.2f}×, {cell['accuracy_drop_pp']:+.2f} pp")
            else:
                refusals.append(f"- **{r['family']} × {c}**: `{cell['refusal']}`")
                cells.append(f"refused [{len(refusals)}]")
        lines.append(f"| {r['family']} | {100 * r['teacher_accuracy']:.2f} % | " + " | ".join(cells) + " |")
    lines += ["", "## Refusals", "", *(f"{i}. {line[2:]}" for i, line in enumerate(refusals, 1)), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--mnist", type=Path, default=None, help="run on MNIST (this folder) instead of digits")
    ap.add_argument("--train-limit", type=int, default=10000, help="MNIST training images (with --mnist)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "models.md")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "models_matrix.json")
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS),
                    help="run only these cells and merge them into the results already in --out")
    ap.add_argument("--render", type=Path, default=None, help="only write --doc from this results JSON (no run)")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        args.doc.write_text(render(saved["results"], saved["data"]))
        return
    import torch

    torch.set_num_threads(1)
    if args.mnist:
        base = [f"data.path={json.dumps(str(args.mnist.resolve()))}", f"data.train_limit={args.train_limit}"]
        data = f"MNIST ({args.train_limit:,} training images), each family's preset"
    else:
        base = DIGITS
        data = "sklearn digits (1×8×8, 1,257 training images), each family's preset with a digits-sized budget (teacher 30 epochs, fine-tuning and distillation 3)"
    partial = set(args.cells) != set(CELLS)  # the other cells stay as measured before (--out)
    saved = json.loads(args.out.read_text()) if partial else None
    if partial and saved["data"] != data:
        raise SystemExit(f"--cells: {args.out} was measured on other data; rerun every cell")
    results = []
    with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
        for family in args.families:
            print(f"{family} ...", flush=True)
            extra = ["train_teacher.model.patch=null"] if family == "transformer" and not args.mnist else []
            results.append(run_family(family, [*base, *extra], Path(tmp), args.cells))
    if partial:
        before = {r["family"]: r for r in saved["results"]}
        for r in results:
            old = before.get(r["family"], {"cells": {}})
            r["cells"] = {k: r["cells"][k] if k in r["cells"] else old["cells"][k]
                          for k in [*CELLS, "onnx"] if k in r["cells"] or k in old["cells"]}
        results += [r for f, r in before.items() if f not in args.families]
        results.sort(key=lambda r: FAMILIES.index(r["family"]) if r["family"] in FAMILIES else len(FAMILIES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": data, "host": {"torch": torch.__version__}, "results": results}, indent=1) + "\n")
    args.doc.write_text(render(results, data))
    print(f"wrote {args.doc} and {args.out}")


if __name__ == "__main__":
    main()
