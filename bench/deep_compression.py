"""Deep Compression (Han et al., ICLR 2016) Table 1 on MNIST, through the product: the presets
``examples/deep-compression-lenet300`` and ``examples/deep-compression-lenet5`` run by `dvc repro`.

    .venv/bin/python bench/deep_compression.py --mnist PATH/TO/mnist [--nets lenet300 lenet5] [--seeds 0 1 2]

Per net and seed, in a fresh clone of HEAD: the preset (the paper's per-layer densities and
bit widths) with ``seed`` and ``data.path`` set, then `dvc repro`. Baseline: the run's own fp32
teacher file (``models/train_teacher/model.pt``). The three steps, each a file on disk:

1. **prune**: the pruned model packed without entropy coding (``shrinkflow pack --no-huffman``:
   relative-index positions + raw values);
2. **share**: the k-means-shared model packed without entropy coding (fixed-width indices);
3. **code**: the evaluate stage's packed file (Huffman-coded), the preset's result.

Errors are the test split's, from reports/metrics.json, where each variant is measured by
loading its file (packing is lossless: the packed files compute what the .pt files do).
Writes bench/results/deep_compression.json and prints a markdown table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from presets import error_pct, host, mean_se, parser, run_preset, write_results

PRESETS = {"lenet300": "examples/deep-compression-lenet300/params.yaml", "lenet5": "examples/deep-compression-lenet5/params.yaml"}
PAPER = {
    "lenet300": {"base_kb": 1070, "final_kb": 27, "ratio": 40, "err_ref": 1.64, "err_final": 1.58},
    "lenet5": {"base_kb": 1720, "final_kb": 44, "ratio": 39, "err_ref": 0.80, "err_final": 0.74},
}


def one(net: str, seed: int, mnist: Path, workdir: Path, cache: Path, extra: list[str]) -> dict:
    run = run_preset(PRESETS[net], [f"seed={seed}", f"data.path={mnist}", *extra], workdir, cache_dir=cache, name=f"{net}-seed{seed}")
    m = run.metrics
    teacher_bytes = m["teacher"].size_bytes
    run.cli("pack", "models/prune/model.pt", "prune.sfz", "--no-huffman")
    run.cli("pack", "models/quantize/model.pt", "share.sfz", "--no-huffman")
    steps = {
        "prune": (os.path.getsize(run.workspace / "prune.sfz"), m["pruned"].accuracy),
        "share": (os.path.getsize(run.workspace / "share.sfz"), m["quantized"].accuracy),
        "code": (m["student"].size_bytes, m["student"].accuracy),
    }
    teacher_err = error_pct(m["teacher"].accuracy)
    out = {
        "net": net, "seed": seed, "command": run.command, "seconds": round(run.seconds, 1), "ran": run.ran,
        "teacher": {"size_bytes": teacher_bytes, "error_pct": teacher_err},
        "steps": {k: {"size_bytes": b, "ratio": teacher_bytes / b, "error_pct": error_pct(a), "delta_pp": error_pct(a) - teacher_err}
                  for k, (b, a) in steps.items()},
        "breakdown": run.pack.get("breakdown"),
        "tensors": run.pack.get("tensors"),
        "gates": [g.model_dump() for g in run.manifests["evaluate"].gates],
    }
    print(f"{net} seed {seed}: {teacher_bytes:,} B → {steps['code'][0]:,} B ({out['steps']['code']['ratio']:.1f}×), "
          f"error {teacher_err:.2f} → {out['steps']['code']['error_pct']:.2f} % in {run.seconds:.0f} s", flush=True)
    return out


def table(runs: list[dict]) -> str:
    lines = ["| net | seeds | teacher file | teacher error % | step | file bytes (mean) | ratio (mean, min) | error Δ pp (mean ± se) |",
             "|---|---|---|---|---|---|---|---|"]
    for net in PRESETS:
        rs = [r for r in runs if r["net"] == net]
        if not rs:
            continue
        p = PAPER[net]
        lines.append(f"| {net} | paper | {p['base_kb']} KB | {p['err_ref']:.2f} | prune+share+code | {p['final_kb']} KB | "
                     f"{p['ratio']}× | {p['err_final'] - p['err_ref']:+.2f} |")
        tb, te = mean_se([r["teacher"]["size_bytes"] for r in rs]), mean_se([r["teacher"]["error_pct"] for r in rs])
        for step in ("prune", "share", "code"):
            size = mean_se([r["steps"][step]["size_bytes"] for r in rs])[0]
            ratios = [r["steps"][step]["ratio"] for r in rs]
            d, se = mean_se([r["steps"][step]["delta_pp"] for r in rs])
            lines.append(f"| {net} | {', '.join(str(r['seed']) for r in rs)} | {tb[0]:,.0f} B | {te[0]:.2f} ± {te[1]:.2f} | {step} | "
                         f"{size:,.0f} | {sum(ratios) / len(ratios):.1f}×, {min(ratios):.1f}× | {d:+.2f} ± {se:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, "deep_compression.json", seeds=[0, 1, 2])
    ap.add_argument("--nets", nargs="+", default=["lenet300"], choices=sorted(PRESETS))
    ap.add_argument("--cache", type=Path, default=None, help="DVC cache shared by the clones; default: <workdir>/cache")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deep-compression-"))
    h = host()
    runs = []
    for net in args.nets:
        for seed in args.seeds:
            runs.append(one(net, seed, args.mnist.resolve(), workdir, args.cache or workdir / "cache", args.extra))
            write_results(args.out, {"host": h, "runs": runs, "paper": PAPER})  # after every run: a long bench reports what it finished
    print(table(runs))
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
