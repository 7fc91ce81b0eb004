"""LeNet-300-100 on full MNIST: remove 92 % of the weights at ≤ 0.1 pp accuracy drop (Han et al. 2015).

    .venv/bin/python bench/prune_lenet300.py --mnist ../shared/data/mnist [--seeds 0 1 2]

Han et al. 2015 ("Learning both Weights and Connections"), Table 1: LeNet-300-100,
267K → 22K parameters (12×), error 1.64 % → 1.59 %, with per-layer densities
8 % / 9 % / 26 % and iterative prune + retrain.

Here, per seed: train an fp32 teacher (fixed epochs; its dense ``model.pt`` is the
size baseline), then run the prune stage's own code: magnitude pruning, 92 % of
fc1/fc2 weights ranked globally and 74 % of the output layer (``layers: {net.5:
0.74}``, Han's 26 % density), on the ``iterative`` schedule (rounds of prune +
fine-tune), optionally under the teacher's soft targets. The pruned model is saved
with the ``sparse`` storage; its size is the file's, its accuracy is measured on the
test split after loading that file. A dynamic-int8 copy of the pruned model (same
storage) is reported as a second row. The test split chooses nothing.

Writes bench/results/prune_lenet300.json and prints a markdown table.
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
from schemas.prune import MagnitudePrune, PruneFinetune
from shrinkflow.artifacts import load_model, save_model
from shrinkflow.models import count_params
from shrinkflow.pruning import sparsity

PAPER = {"params_before": 267_000, "params_after": 22_000, "err_before_pct": 1.64, "err_after_pct": 1.59}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="iterative schedule: prune + fine-tune rounds")
    ap.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning epochs per round")
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--sparsity", type=float, default=0.92)
    ap.add_argument("--no-distill", action="store_true", help="fine-tune on labels only")
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/prune_lenet300.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    params = MagnitudePrune(
        sparsity=args.sparsity, scope="global", layers={"net.5": 0.74}, schedule="iterative", rounds=args.rounds,
        finetune=PruneFinetune(
            epochs=args.ft_epochs, batch_size=64, optimizer=Optimizer(name="sgd", lr=args.ft_lr, momentum=0.9),
            distill_from_teacher=not args.no_distill,
        ),
    )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            splits = mnist(args.mnist, seed, args.train_limit)
            tpath, ppath, qpath = tmp / f"teacher{seed}.pt", tmp / f"pruned{seed}.pt", tmp / f"pruned_int8_{seed}.pt"
            t_teacher = train_teacher({"arch": "mlp", "hidden": [300, 100]}, splits, args.teacher_epochs, 0.05, seed, tpath)
            t_prune = prune_file(tpath, params, splits, seed, ppath)
            teacher, _ = load_model(tpath)
            pruned, header = load_model(ppath)
            from shrinkflow.quantization import dynamic

            qmodel, entry = dynamic.quantize(pruned, None)
            save_model(qmodel, qpath, header.with_transform(entry.pop("kind"), **entry))
            qloaded, _ = load_model(qpath)
            total, per_layer = sparsity(pruned)
            row = {
                "seed": seed,
                "teacher": {"bytes": os.path.getsize(tpath), "params": count_params(teacher)[0], "acc_pct": accuracy_pct(teacher, splits),
                            "val_acc_pct": accuracy_pct(teacher, splits, "val")},
                "pruned": {"bytes": os.path.getsize(ppath), "params": count_params(pruned)[0], "nonzero": count_params(pruned)[1],
                           "acc_pct": accuracy_pct(pruned, splits), "val_acc_pct": accuracy_pct(pruned, splits, "val"),
                           "weight_sparsity": total, "layer_sparsity": per_layer},
                "pruned_int8": {"bytes": os.path.getsize(qpath), "acc_pct": accuracy_pct(qloaded, splits)},
                "seconds": {"teacher": t_teacher, "prune": t_prune},
            }
            row["drop_pp"] = row["teacher"]["acc_pct"] - row["pruned"]["acc_pct"]
            runs.append(row)
            print(f"seed {seed}: teacher {row['teacher']['acc_pct']:.2f} % → pruned {row['pruned']['acc_pct']:.2f} % "
                  f"({row['pruned']['nonzero']:,} nonzero params, {row['pruned']['bytes']:,} B)", flush=True)

    def mean(f):
        vals = [f(r) for r in runs]
        return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)

    t_b = runs[0]["teacher"]["bytes"]
    lines = [
        f"LeNet-300-100, full MNIST test set, {len(runs)} seed(s) {args.seeds}; mean ± spread over seeds. "
        f"Teacher {args.teacher_epochs} epochs; magnitude {args.sparsity:.0%} global (fc1+fc2) + 74 % fc3, iterative "
        f"{args.rounds}×{args.ft_epochs} epochs{'' if args.no_distill else ' with teacher soft targets'}.",
        "",
        "| variant | file bytes | × smaller | nonzero params | test error % | Δ accuracy (pp) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    acc_t = mean(lambda r: r["teacher"]["acc_pct"])
    lines.append(f"| teacher fp32 (dense) | {t_b:,} | 1.0 | {runs[0]['teacher']['params']:,} | {100 - acc_t[0]:.2f} ± {acc_t[1]:.2f} | – |")
    for key, label in (("pruned", "pruned, sparse storage"), ("pruned_int8", "pruned + dynamic int8, sparse storage")):
        b = mean(lambda r, k=key: r[k]["bytes"])
        a = mean(lambda r, k=key: r[k]["acc_pct"])
        d = mean(lambda r, k=key: r["teacher"]["acc_pct"] - r[k]["acc_pct"])
        nz = f"{mean(lambda r: r['pruned']['nonzero'])[0]:,.0f}"
        lines.append(f"| {label} | {b[0]:,.0f} | {t_b / b[0]:.1f} | {nz} | {100 - a[0]:.2f} ± {a[1]:.2f} | {-d[0]:+.2f} ± {d[1]:.2f} |")
    lines.append(f"| Han et al. 2015 | – | 12 (params) | {PAPER['params_after']:,} of {PAPER['params_before']:,} | "
                 f"{PAPER['err_before_pct']} → {PAPER['err_after_pct']} | +0.05 |")
    h = host()
    lines += ["", f"Host: {h['cpu']}, {args.threads} thread(s), torch {h['torch']}."]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"host": {**h, "threads": args.threads}, "args": {k: v for k, v in vars(args).items() if k not in ("mnist", "out")},
                                    "paper": PAPER, "runs": runs, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
