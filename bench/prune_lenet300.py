"""Han et al. 2015, Table 1: LeNet-300-100 pruned 12× at no accuracy loss, through the product.

    .venv/bin/python bench/prune_lenet300.py --mnist PATH/TO/mnist [--seeds 0 1 2]

Runs ``examples/prune-lenet300`` (iterative magnitude pruning, 92 % of fc1/fc2 and 74 % of
the output layer, retraining under the teacher's soft targets, then dynamic int8) by
`dvc repro` in a fresh clone per seed. Sizes are the variants' .pt files (sparse storage:
bitmask + values); accuracies are measured by loading them; the teacher is each seed's own.
Writes bench/results/prune_lenet300.json and prints a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from presets import error_pct, host, mean_se, parser, run_preset, write_results

PRESET = "examples/prune-lenet300/params.yaml"
PAPER = {"params_before": 267_000, "params_after": 22_000, "err_before_pct": 1.64, "err_after_pct": 1.59}


def main() -> None:
    ap = parser(__doc__, "prune_lenet300.json", seeds=[0, 1, 2])
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prune-lenet300-"))
    h = host()
    runs = []
    for seed in args.seeds:
        run = run_preset(PRESET, [f"seed={seed}", f"data.path={args.mnist.resolve()}", *args.extra], workdir,
                         cache_dir=workdir / "cache", name=f"seed{seed}")
        runs.append({"seed": seed, **run.summary()})
        m = run.metrics
        print(f"seed {seed}: {m['teacher'].nonzero_params:,} → {m['pruned'].nonzero_params:,} weights, error "
              f"{error_pct(m['teacher'].accuracy):.2f} → {error_pct(m['pruned'].accuracy):.2f} %", flush=True)
    write_results(args.out, {"host": h, "paper": PAPER, "runs": runs})

    def stat(variant: str, key: str) -> tuple[float, float]:
        return mean_se([r["metrics"][variant][key] for r in runs])

    def err(variant: str) -> tuple[float, float]:
        return mean_se([error_pct(r["metrics"][variant]["accuracy"]) for r in runs])

    drops = mean_se([error_pct(r["metrics"]["pruned"]["accuracy"]) - error_pct(r["metrics"]["teacher"]["accuracy"]) for r in runs])
    print(f"\n`{runs[0]['command']}` (seeds {', '.join(str(s) for s in args.seeds)})\n")
    print("| | dense teacher | pruned (sparse file) | pruned + dynamic int8 |\n|---|---:|---:|---:|")
    print(f"| nonzero weights | {stat('teacher', 'nonzero_params')[0]:,.0f} | {stat('pruned', 'nonzero_params')[0]:,.0f} "
          f"({stat('teacher', 'nonzero_params')[0] / stat('pruned', 'nonzero_params')[0]:.1f}×) | {stat('quantized', 'nonzero_params')[0]:,.0f} |")
    print(f"| file bytes | {stat('teacher', 'size_bytes')[0]:,.0f} | {stat('pruned', 'size_bytes')[0]:,.0f} "
          f"({stat('pruned', 'compression_ratio')[0]:.1f}×) | {stat('quantized', 'size_bytes')[0]:,.0f} ({stat('quantized', 'compression_ratio')[0]:.1f}×) |")
    print(f"| test error % | {err('teacher')[0]:.2f} ± {err('teacher')[1]:.2f} | {err('pruned')[0]:.2f} ± {err('pruned')[1]:.2f} | "
          f"{err('quantized')[0]:.2f} ± {err('quantized')[1]:.2f} |")
    print(f"| error Δ vs teacher (pp) | | {drops[0]:+.2f} ± {drops[1]:.2f} | |")
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
