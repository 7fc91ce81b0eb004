"""Structured pruning of LeNet-5 (half of every layer's channels), through the product: fewer
MACs and a real CPU speedup at no accuracy loss.

    .venv/bin/python bench/prune_lenet5_structured.py --mnist PATH/TO/mnist [--seeds 0 1 2]

Runs ``examples/structured-lenet5`` by `dvc repro` in a fresh clone per seed; the evaluate
stage times the teacher and the pruned model in one process, interleaved, 1 thread, at
batch 1 and 256 (BENCH-PROTOCOL). Latency needs an otherwise idle CPU: the load average at
the start is recorded. Writes bench/results/prune_lenet5_structured.json, prints a table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from presets import host, mean_se, parser, run_preset, write_results

PRESET = "examples/structured-lenet5/params.yaml"


def main() -> None:
    ap = parser(__doc__, "prune_lenet5_structured.json", seeds=[0, 1, 2])
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="structured-lenet5-"))
    h = host()
    runs = []
    for seed in args.seeds:
        run = run_preset(PRESET, [f"seed={seed}", f"data.path={args.mnist.resolve()}", *args.extra], workdir,
                         cache_dir=workdir / "cache", name=f"seed{seed}")
        runs.append({"seed": seed, **run.summary()})
        t, p = run.metrics["teacher"], run.metrics["pruned"]
        print(f"seed {seed}: params {t.params:,} → {p.params:,}, b256 {t.latency_ms(256):.2f} → {p.latency_ms(256):.2f} ms "
              f"({p.speedup(256):.2f}×), accuracy {t.accuracy:.4f} → {p.accuracy:.4f}", flush=True)
    write_results(args.out, {"host": h, "runs": runs})

    def col(variant: str, key: str) -> tuple[float, float]:
        return mean_se([float(r["metrics"][variant][key]) for r in runs])

    drop = mean_se([100 * (r["metrics"]["teacher"]["accuracy"] - r["metrics"]["pruned"]["accuracy"]) for r in runs])
    print(f"\n`{runs[0]['command']}` (seeds {', '.join(str(s) for s in args.seeds)})\n")
    print("| | teacher | structured 50 % |\n|---|---:|---:|")
    for key, fmt in (("params", "{:,.0f}"), ("macs", "{:,.0f}"), ("size_bytes", "{:,.0f}"), ("latency_ms_b1", "{:.3f} ms"),
                     ("latency_ms_b256", "{:.2f} ms")):
        print(f"| {key} | {fmt.format(col('teacher', key)[0])} | {fmt.format(col('pruned', key)[0])} |")
    for b in (1, 256):
        s = col("pruned", f"speedup_b{b}")
        print(f"| speedup b{b} | | **{s[0]:.2f} ± {s[1]:.2f}×** |")
    print(f"| test accuracy | {100 * col('teacher', 'accuracy')[0]:.2f} % | {100 * col('pruned', 'accuracy')[0]:.2f} % "
          f"({-drop[0]:+.2f} ± {drop[1]:.2f} pp) |")
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
