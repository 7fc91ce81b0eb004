"""Quantization of LeNet-5 and LeNet-300-100 on MNIST, through the product.

    .venv/bin/python bench/quantize_lenet.py --mnist PATH/TO/mnist [--seed 0]

- LeNet-5, static int8: ``examples/quantize-lenet5`` by `dvc repro`, and the same with
  ``structured`` 50 % first (the settings of ``examples/structured-lenet5``). The static
  int8 model is a pt2e graph; its latency is measured in the runtimes a user deploys,
  teacher and variants interleaved in one process, 1 thread, batch 1 and 256:
  ``compile`` (what the evaluate stage reports: ``evaluate.runtime: auto`` compiles
  every variant when one is a static int8 graph), ``onnxruntime`` (``shrinkflow export``
  of each variant's file: the fp32 graph and the int8 QDQ graph, timed here with
  ``measure.latencies_ms``), and ``eager`` (``evaluate.runtime: eager``: the reference
  kernels of an int8 graph, to show why it is not the reported runtime).
- LeNet-300-100: ``examples/mnist-lenet300`` with pruning and distillation disabled and a
  5-epoch teacher, once per method (dynamic, static, k-means 4-bit with 1 centroid
  fine-tuning epoch); the clones share one DVC cache, so the teacher is trained once and
  restored from the run-cache by the other runs.

Sizes are the .pt files (pack: none), accuracies measured by loading them. Latency needs an
otherwise idle CPU: the load average at the start is recorded. Writes
bench/results/quantize_lenet.json and prints markdown tables.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from presets import host, parser, run_preset, write_results

#: ``examples/structured-lenet5``'s pruning, before the static int8 of ``examples/quantize-lenet5``.
STRUCTURED = ["prune={method: structured, sparsity: 0.5, scope: layer, finetune: {epochs: 1, batch_size: 128, "
              "optimizer: {name: sgd, lr: 0.01, momentum: 0.9}, distill_from_teacher: true}}"]
VARIANTS = {"teacher": "train_teacher", "pruned": "prune", "quantized": "quantize"}


def onnxruntime_latency(run, variants: list[str], min_run_time: float) -> dict:
    """``shrinkflow export`` of each variant's file in the run's workspace, then onnxruntime latency of all of
    them interleaved (1 thread, batch 1 and 256, the test split): {variant: {batch: ms}}, and how each exported."""
    from schemas.paths import StagePaths
    from shrinkflow.data import load_splits
    from shrinkflow.export import onnx_session
    from shrinkflow.measure import latencies_ms

    paths = StagePaths(run.workspace)
    runners, how = {}, {}
    for v in variants:
        out = run.workspace / f"{v}.onnx"
        how[v] = run.cli("export", str(paths.model(VARIANTS[v])), str(out), "--no-check").strip()
        sess = onnx_session(out, threads=1)
        name = sess.get_inputs()[0].name
        runners[v] = lambda x, s=sess, n=name: s.run(None, {n: x.numpy()})[0]
    X, _ = load_splits(paths.splits).tensors("test")
    return {"latency_ms": latencies_ms(runners, X, [1, 256], threads=1, min_run_time=min_run_time), "exported": how}


def lenet5(common: list[str], workdir: Path) -> dict:
    preset = "examples/quantize-lenet5/params.yaml"
    runs = {
        "static": run_preset(preset, common, workdir, cache_dir=workdir / "cache", name="lenet5"),
        "structured+static": run_preset(preset, [*common, *STRUCTURED], workdir, cache_dir=workdir / "cache", name="lenet5-structured"),
        "static-eager": run_preset(preset, [*common, "evaluate.runtime=eager"], workdir, cache_dir=workdir / "cache",
                                   name="lenet5-eager"),
    }
    out: dict = {name: run.summary() for name, run in runs.items()}
    out["onnxruntime"] = {
        "static": onnxruntime_latency(runs["static"], ["teacher", "quantized"], 2.0),
        "structured+static": onnxruntime_latency(runs["structured+static"], ["teacher", "pruned", "quantized"], 2.0),
    }
    for run in runs.values():
        m = run.metrics
        print(f"\n`{run.command}` ({m['teacher'].runtime}, 1 thread; dvc repro {run.seconds:.0f} s)\n")
        print("| LeNet-5 | file bytes | test acc | batch 1 | batch 256 |\n|---|---|---|---|---|")
        for v in ("teacher", "pruned", "quantized"):
            r = m[v]
            if v == "pruned" and r.format == m["teacher"].format:
                continue  # pruning disabled
            print(f"| {v} ({r.format}) | {r.size_bytes:,} ({r.compression_ratio:.2f}×) | {100 * r.accuracy:.2f} % | "
                  f"{r.latency_ms(1):.3f} ms ({r.speedup(1):.2f}×) | {r.latency_ms(256):.2f} ms ({r.speedup(256):.2f}×) |")
    for name, res in out["onnxruntime"].items():
        lat = res["latency_ms"]
        print(f"\nonnxruntime, {name} (`shrinkflow export` of each file, 1 thread):\n")
        print("| LeNet-5 | batch 1 | batch 256 |\n|---|---|---|")
        for v, ms in lat.items():
            print(f"| {v} | {ms[1]:.3f} ms ({lat['teacher'][1] / ms[1]:.2f}×) | {ms[256]:.2f} ms ({lat['teacher'][256] / ms[256]:.2f}×) |")
    return out

LENET300 = ["prune.enabled=false", "distill.enabled=false", "evaluate.pack=none", "train_teacher.epochs=5",
            "train_teacher.batch_size=128", "evaluate.min_run_time=2.0"]
METHODS = {
    "dynamic": ["quantize={method: dynamic}"],
    "static": ["quantize={method: static, calibration_batches: 20, calibration_batch_size: 128}"],
    "kmeans-4bit": ["quantize={method: kmeans, bits: 4, finetune: {epochs: 1, batch_size: 128, optimizer: {lr: 0.01}}}"],
}


def main() -> None:
    ap = parser(__doc__, "quantize_lenet.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nets", nargs="+", default=["lenet5", "lenet300"], choices=["lenet5", "lenet300"])
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quantize-lenet-"))
    common = [f"seed={args.seed}", f"data.path={args.mnist.resolve()}", *args.extra]
    h = host()
    result: dict = {"host": h}
    if "lenet5" in args.nets:
        result["lenet5"] = lenet5(common, workdir)
    if "lenet300" in args.nets:
        rows = {}
        for name, sets in METHODS.items():
            run = run_preset("examples/mnist-lenet300/params.yaml", [*common, *LENET300, *sets], workdir,
                             cache_dir=workdir / "cache", name=f"lenet300-{name}")
            rows[name] = run.summary()
        result["lenet300"] = rows
        first = next(iter(rows.values()))
        t = first["metrics"]["teacher"]
        print(f"\n`{first['command']}` with quantize.method = each of {', '.join(METHODS)}\n")
        print("| LeNet-300-100 | file bytes | vs fp32 | test acc | drop |\n|---|---|---|---|---|")
        print(f"| fp32 | {t['size_bytes']:,} | 1.00× | {100 * t['accuracy']:.2f} % | |")
        for name, r in rows.items():
            q = r["metrics"]["quantized"]
            drop = 100 * (r["metrics"]["teacher"]["accuracy"] - q["accuracy"])
            print(f"| {name} | {q['size_bytes']:,} | {q['compression_ratio']:.2f}× | {100 * q['accuracy']:.2f} % | {drop:+.2f} pp |")
    write_results(args.out, result)
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
