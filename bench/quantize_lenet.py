"""Quantization of LeNet-5 and LeNet-300-100 on MNIST, through the product.

    .venv/bin/python bench/quantize_lenet.py --mnist PATH/TO/mnist [--seed 0]

- LeNet-5, static int8: ``examples/quantize-lenet5`` by `dvc repro` (teacher and quantized
  model timed in one process by the evaluate stage, 1 thread, batch 1 and 256).
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
        run = run_preset("examples/quantize-lenet5/params.yaml", common, workdir, cache_dir=workdir / "cache", name="lenet5")
        result["lenet5"] = run.summary()
        t, q = run.metrics["teacher"], run.metrics["quantized"]
        print(f"\n`{run.command}`\n\n| LeNet-5 | file bytes | test acc | batch 1 | batch 256 |\n|---|---|---|---|---|")
        print(f"| fp32 | {t.size_bytes:,} | {100 * t.accuracy:.2f} % | {t.latency_ms(1):.3f} ms | {t.latency_ms(256):.2f} ms |")
        print(f"| static int8 | {q.size_bytes:,} ({q.compression_ratio:.2f}×) | {100 * q.accuracy:.2f} % | "
              f"{q.latency_ms(1):.3f} ms ({q.speedup(1):.2f}×) | {q.latency_ms(256):.2f} ms ({q.speedup(256):.2f}×) |", flush=True)
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
