"""The quick preset (``examples/mnist-lenet300``) against a naive recipe on the same pruned model.

    .venv/bin/python bench/quick_vs_naive.py --mnist PATH/TO/mnist [--seeds 0 1 2]

The product: ``examples/mnist-lenet300`` (90 % global magnitude pruning + 2 fine-tuning
epochs, dynamic int8, 2 epochs of distillation, packed ``.sfz``) by `dvc repro` in a fresh
clone; its ``student`` row (the packed file) against its own fp32 teacher file.

The naive baseline, for comparison only (it is not a shrinkflow method and no stage runs
it): the very pruned model that preset's prune stage wrote (``models/prune/model.pt``),
stored the way one would by hand: each weight matrix as a bitmask of its non-zeros plus
the non-zeros as int8 (symmetric, one scale per tensor), biases as float32, everything
concatenated and compressed with xz (lzma preset 9). Its size is that byte string's length;
its error is measured with the int8 weights put back into the model.
Writes bench/results/quick_vs_naive.json and prints a table.
"""

from __future__ import annotations

import lzma
import tempfile
from pathlib import Path

import numpy as np
import torch
from presets import error_pct, host, mean_se, parser, run_preset, write_results

from shrinkflow.data import load_splits
from shrinkflow.loading import load_model
from shrinkflow.training import predict, quality

PRESET = "examples/mnist-lenet300/params.yaml"


def naive(model: torch.nn.Module) -> tuple[int, torch.nn.Module]:
    """(bytes of bitmask + int8 values + fp32 biases, xz-compressed; the model with those int8 weights)."""
    parts: list[bytes] = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().cpu().numpy()
            if name.endswith("weight"):
                mask = w != 0
                scale = float(np.abs(w).max()) / 127 or 1.0
                ints = np.clip(np.round(w[mask] / scale), -127, 127).astype(np.int8)
                parts += [np.packbits(mask.reshape(-1)).tobytes(), np.float32(scale).tobytes(), ints.tobytes()]
                restored = np.zeros_like(w)
                restored[mask] = ints.astype(np.float32) * scale
                p.copy_(torch.from_numpy(restored))
            else:
                parts.append(w.astype(np.float32).tobytes())
    return len(lzma.compress(b"".join(parts), preset=9 | lzma.PRESET_EXTREME)), model


def main() -> None:
    ap = parser(__doc__, "quick_vs_naive.json", seeds=[0, 1, 2])
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quick-vs-naive-"))
    h = host()
    runs = []
    for seed in args.seeds:
        run = run_preset(PRESET, [f"seed={seed}", f"data.path={args.mnist.resolve()}", *args.extra], workdir,
                         cache_dir=workdir / "cache", name=f"seed{seed}")
        m = run.metrics
        pruned, _ = load_model(run.workspace / "models/prune/model.pt")
        size, model = naive(pruned)
        X, y = load_splits(run.workspace / "data/prepared/splits.npz").tensors("test")
        naive_acc = quality(predict(model, X), y, "classification")
        row = {
            "seed": seed, "command": run.command, "teacher_bytes": m["teacher"].size_bytes,
            "teacher_error_pct": error_pct(m["teacher"].accuracy),
            "preset": {"bytes": m["student"].size_bytes, "ratio": m["student"].compression_ratio,
                       "error_pct": error_pct(m["student"].accuracy)},
            "naive": {"bytes": size, "ratio": m["teacher"].size_bytes / size, "error_pct": error_pct(naive_acc)},
        }
        runs.append(row)
        print(f"seed {seed}: preset {row['preset']['bytes']:,} B ({row['preset']['ratio']:.1f}×), naive {size:,} B "
              f"({row['naive']['ratio']:.1f}×)", flush=True)
    write_results(args.out, {"host": h, "runs": runs})
    print(f"\n`{runs[0]['command']}` (seeds {', '.join(str(s) for s in args.seeds)})\n")
    print("| | file bytes (mean) | ratio (mean ± se) | error Δ vs teacher pp (mean ± se) |\n|---|---|---|---|")
    for key, label in (("preset", "examples/mnist-lenet300, packed .sfz"), ("naive", "naive: bitmask + int8 + xz, same pruned model")):
        b = mean_se([r[key]["bytes"] for r in runs])
        ratio = mean_se([r[key]["ratio"] for r in runs])
        d = mean_se([r[key]["error_pct"] - r["teacher_error_pct"] for r in runs])
        print(f"| {label} | {b[0]:,.0f} | {ratio[0]:.1f} ± {ratio[1]:.1f}× | {d[0]:+.2f} ± {d[1]:.2f} |")
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
