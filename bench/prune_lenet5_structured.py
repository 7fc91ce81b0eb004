"""Structured pruning of LeNet-5 on full MNIST: latency speedup at batch 256 and the accuracy it costs.

    .venv/bin/python bench/prune_lenet5_structured.py --mnist ../shared/data/mnist [--seeds 0 1 2 --teacher-epochs 2 --ft-epochs 1]

Train an fp32 LeNet-5 (Caffe variant, conv20-conv50-fc500-fc10) for a fixed number
of epochs, then run the prune stage's own code with ``method: structured``
(Torch-Pruning, group L2 importance, ``sparsity`` = share of channels/neurons
removed from every layer but the output layer), fine-tune, and save with the
stage's file format. Both models are then loaded from their files and measured in
one process: test accuracy, parameters, MACs, file size, and eager-PyTorch latency
at batch 1 and 256 (``shrinkflow.measure.latencies_ms``: fixed threads, warm-up,
variants interleaved, median of repeated ``torch.utils.benchmark`` runs).

Epoch counts default low to fit a shared 2-core CPU (LeNet-5 is ~34 s/epoch on two
free cores): accuracies are below the published ~99.2 %, but teacher and pruned
model come from the same run, so the drop is what to read. The test split chooses
nothing. Writes bench/results/prune_lenet5_structured.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from prune_common import ROOT, accuracy_pct, host, mnist, prune_file, train_teacher

from schemas.common import Optimizer
from schemas.prune import PruneFinetune, StructuredPrune
from shrinkflow.artifacts import load_model
from shrinkflow.measure import latencies_ms, macs
from shrinkflow.models import count_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--teacher-lr", type=float, default=0.02)
    ap.add_argument("--sparsity", type=float, default=0.5, help="share of channels/neurons removed per layer")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--no-distill", action="store_true", help="fine-tune on labels only")
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch size")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/prune_lenet5_structured.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    params = StructuredPrune(
        method="structured", sparsity=args.sparsity, scope="layer", norm=2,
        finetune=PruneFinetune(
            epochs=args.ft_epochs, batch_size=64, optimizer=Optimizer(name="sgd", lr=args.ft_lr, momentum=0.9),
            distill_from_teacher=not args.no_distill,
        ),
    )
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, params, seed))
    h = host()
    lines = [
        f"LeNet-5 on full MNIST, seed(s) {args.seeds}: teacher {args.teacher_epochs} epoch(s); structured {args.sparsity:.0%} of "
        f"channels/neurons per layer, {args.ft_epochs} fine-tune epoch(s){'' if args.no_distill else ' with teacher soft targets'}.",
        "",
        "| seed | variant | test acc % | params | MACs | file bytes | ms b1 | ms b256 | speedup b1 | speedup b256 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        t = r["figures"]["teacher"]
        for name, f in r["figures"].items():
            lines.append(
                f"| {r['seed']} | {name} | {f['acc_pct']:.2f} | {f['params']:,} | {f['macs']:,} | {f['bytes']:,} | "
                f"{f['latency_ms']['1']:.3f} | {f['latency_ms']['256']:.2f} | {t['latency_ms']['1'] / f['latency_ms']['1']:.2f} | "
                f"{t['latency_ms']['256'] / f['latency_ms']['256']:.2f} |"
            )

    def stat(values):
        return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)

    sp = stat([r["speedup_b256"] for r in runs])
    dr = stat([r["drop_pp"] for r in runs])
    lines += [
        "",
        f"Mean over seeds: speedup at batch 256 {sp[0]:.2f}× ± {sp[1]:.2f}; accuracy drop {dr[0]:+.2f} ± {dr[1]:.2f} pp.",
        f"Pruned layers: {runs[0]['figures']['pruned']['layers']}",
        f"Host: {h['cpu']}, {args.threads} thread(s), torch {h['torch']}; eager PyTorch for both.",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "host": {**h, "threads": args.threads},
        "args": {k: v for k, v in vars(args).items() if k not in ("mnist", "out")},
        "runs": runs, "mean_speedup_b256": sp, "mean_drop_pp": dr,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2) + "\n")


def run_seed(args, params, seed: int) -> dict:
    """Teacher, structured prune, then both files measured in one process."""
    splits = mnist(args.mnist, seed, args.train_limit)
    with tempfile.TemporaryDirectory() as tmp:
        tpath, ppath = Path(tmp) / "teacher.pt", Path(tmp) / "pruned.pt"
        t_teacher = train_teacher({"arch": "lenet5"}, splits, args.teacher_epochs, args.teacher_lr, seed, tpath)
        t_prune = prune_file(tpath, params, splits, seed, ppath)
        models, figures = {}, {}
        for name, path in (("teacher", tpath), ("pruned", ppath)):
            models[name], header = load_model(path)
            figures[name] = {
                "bytes": os.path.getsize(path),
                "params": count_params(models[name])[0],
                "macs": macs(models[name], header),
                "acc_pct": accuracy_pct(models[name], splits),
                "layers": {n: list(m.weight.shape) for n, m in models[name].named_modules() if getattr(m, "weight", None) is not None},
            }
    X, _ = splits.tensors("test")
    lat = latencies_ms(models, X, [1, 256], threads=args.threads, min_run_time=args.min_run_time)
    for name in models:
        figures[name]["latency_ms"] = {str(b): v for b, v in lat[name].items()}
    t, p = figures["teacher"], figures["pruned"]
    print(f"seed {seed}: acc {t['acc_pct']:.2f} → {p['acc_pct']:.2f} %, b256 {t['latency_ms']['256']:.2f} → "
          f"{p['latency_ms']['256']:.2f} ms", flush=True)
    return {
        "seed": seed, "figures": figures, "drop_pp": t["acc_pct"] - p["acc_pct"],
        "speedup_b256": t["latency_ms"]["256"] / p["latency_ms"]["256"],
        "seconds": {"teacher": t_teacher, "prune": t_prune},
    }


if __name__ == "__main__":
    main()
