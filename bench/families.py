"""The model-family presets on MNIST, through the product: a residual CNN, LSTM, GRU, Transformer.

    .venv/bin/python bench/families.py --mnist PATH/TO/mnist [--presets mobilenet lstm gru transformer] [--set KEY=VALUE]

Each ``examples/mnist-<family>/params.yaml`` by `dvc repro` in a fresh clone (``presets.run_preset``):
the teacher's test error; every variant's whole-file size ratio against the teacher's
fp32 file and its error difference, each measured from that file by the evaluate stage;
CPU latency at batch 1 and 256 of the teacher and every variant in one runtime
(``evaluate.runtime: auto``: compiled when a variant is a static int8 graph, eager
otherwise), 1 thread; and the wall time of `dvc repro` (the load average at the start is
recorded: timings need an otherwise idle CPU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from presets import error_pct, host, parser, run_preset, write_results

FAMILIES = ["mobilenet", "lstm", "gru", "transformer"]


def main() -> None:
    ap = parser(__doc__, "families.json")
    ap.add_argument("--presets", nargs="+", default=FAMILIES, choices=FAMILIES)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="families-"))
    common = [f"data.path={args.mnist.resolve()}", *args.extra]
    result: dict = {"host": host(), "runs": {}}
    for family in args.presets:
        load = host()["load_average_at_start"]
        run = run_preset(f"examples/mnist-{family}/params.yaml", common, workdir, name=family)
        result["runs"][family] = {**run.summary(), "load_average_at_start": load}
        m = run.metrics
        t = m["teacher"]
        print(f"\n## {family}: `{run.command}`\n\n`dvc repro` {run.seconds / 60:.1f} min (load average {load:.1f} at the start); "
              f"latency {t.runtime}, 1 thread; teacher error {error_pct(t.accuracy):.2f} %\n")
        print("| variant | format | file bytes | ratio | error % | Δ pp | b1 ms | b256 ms | speedup b1 | speedup b256 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for v, r in m.items():
            print(f"| {v} | {r.format} | {r.size_bytes:,} | {r.compression_ratio:.2f}× | {error_pct(r.accuracy):.2f} | "
                  f"{error_pct(r.accuracy) - error_pct(t.accuracy):+.2f} | {r.latency_ms(1):.3f} | {r.latency_ms(256):.2f} | "
                  f"{r.speedup(1):.2f}× | {r.speedup(256):.2f}× |", flush=True)
    write_results(args.out, result)
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
