"""Hinton et al. 2015 on MNIST, and distillation as recovery of a compressed LeNet-300-100.

    .venv/bin/python bench/distill_hinton.py --mnist ../shared/data/mnist
    # a larger pair (Part A only): teacher 784-1200-1200-10, student 784-300-10
    .venv/bin/python bench/distill_hinton.py --mnist ../shared/data/mnist --parts a \
        --teacher-hidden 1200 1200 --student-hidden 300 --temperature 8 \
        --teacher-epochs 10 --student-epochs 10 --small-epochs 40 --out bench/results/distill_hinton_1200.json

Every error is measured on the MNIST test split (10,000 images) by loading the
model file that was written; the validation split is the preset's 10 % of the
training images; the test split chooses nothing.

**Part A, a small student (Hinton's MNIST row, scaled to a CPU).** The teacher is
LeNet-300-100 trained by the ``train_teacher`` stage of ``examples/mnist-lenet300``
(266,610 parameters); the student an MLP 784-30-10 (23,860 parameters, 8.9 % of
the teacher's). Each student is trained from scratch (hard labels) and from the
teacher (``shrinkflow.distillation.distill``, ``method: logits``, the function
the distill stage calls) with the same epochs, optimizer, batch size and seed,
over 3 seeds. Scratch training is ``distill`` with ``alpha: 0`` (the hard-label
cross-entropy alone, the gradients of plain training), so both go through the
same code. Two transfer sets: the whole training split, and its first 3 % (the
low-data regime where soft targets carry the most information, Hinton §3 and
§5). Gap recovery = (err_scratch − err_kd) / (err_scratch − err_teacher), from
the mean errors.

**Part B, recovery.** The preset's chain (``prune`` → ``quantize`` stages), then
the ``distill`` stage with ``student: compressed`` (the zeros and the quantization
are kept) against the same stage with ``alpha: 0`` (hard-label fine-tuning of the
same compressed model, same budget). Two settings: the preset (90 % magnitude
pruning, 2 fine-tuning epochs, dynamic int8) and a harsher one (98 %, 1 epoch)
that leaves a gap to recover.

T and alpha are fixed in advance: T = 4 for the 30-unit student (Hinton §3: 2.5–4
worked best for 30 units; the 300-unit run uses T = 8, above which Hinton found
no difference for 300+ units), alpha = 0.9 (soft targets dominate); the recovery
keeps the preset's distill section. Writes bench/results/distill_hinton.json
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.common import Optimizer  # noqa: E402
from schemas.distill import LogitsDistill  # noqa: E402
from schemas.paths import StagePaths  # noqa: E402
from shrinkflow.artifacts import ModelHeader, load_model, save_model  # noqa: E402
from shrinkflow.config import load_params  # noqa: E402
from shrinkflow.data import Splits, load_splits  # noqa: E402
from shrinkflow.distillation import distill  # noqa: E402
from shrinkflow.measure import cpu_model  # noqa: E402
from shrinkflow.training import predict, seed_everything  # noqa: E402
from tasks.run import run_stage  # noqa: E402

PRESET = ROOT / "examples" / "mnist-lenet300" / "params.yaml"
#: Hinton et al. 2015, §3: test errors out of 10,000 (teacher 2×1200 with dropout and
#: jittered inputs, student 2×800 without regularization; full transfer set).
PAPER = {"teacher": 67, "scratch": 146, "kd": 74, "recovery": round((146 - 74) / (146 - 67), 2)}
CPU = torch.device("cpu")




def errors(path: Path, X: torch.Tensor, y: torch.Tensor) -> int:
    """Test errors of the model loaded from ``path``."""
    model, _ = load_model(path)
    return int((predict(model, X).argmax(1) != y).sum())


def n_params(path: Path) -> int:
    model, _ = load_model(path)
    return sum(p.numel() for p in model.parameters())


def recovery(err_base: float, err_kd: float, err_teacher: float) -> float | None:
    """Share of the gap to the teacher that distillation closed; None when there is no gap."""
    return (err_base - err_kd) / (err_base - err_teacher) if err_base > err_teacher else None


def fmt(r: float | None) -> str:
    return "n/a (no gap)" if r is None else f"{r:.2f}"


def summary(values: list[int]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def student_runs(splits: Splits, teacher: torch.nn.Module, args, epochs: int, folder: Path, X, y) -> dict:
    header = ModelHeader(
        spec={"arch": "mlp", "hidden": args.student_hidden}, input_shape=splits.input_shape,
        out_features=splits.out_features, task=splits.task,
    )
    out: dict[str, list] = {"scratch": [], "kd": [], "seconds": []}
    for seed in args.seeds:
        for name, alpha in (("scratch", 0.0), ("kd", args.alpha)):
            seed_everything(seed)
            student = header.build()
            params = LogitsDistill(
                temperature=args.temperature, alpha=alpha, epochs=epochs, batch_size=64,
                optimizer=Optimizer(name="sgd", lr=0.05, momentum=0.9),
            )
            start = time.perf_counter()
            distill(student, teacher, splits, params, seed=seed, device=CPU)
            path = folder / f"student-{name}-{seed}.pt"
            save_model(student, path, header)
            out[name].append(errors(path, X, y))
            out["seconds"].append(round(time.perf_counter() - start, 1))
            print(f"  {len(splits.X_train)} images, seed {seed}, {name}: {out[name][-1]} errors", flush=True)
    out["params"] = n_params(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--teacher-hidden", type=int, nargs="+", default=[300, 100],
                    help="teacher MLP widths (Part A); Part B needs the preset's LeNet-300-100")
    ap.add_argument("--parts", nargs="+", choices=["a", "b"], default=["a", "b"])
    ap.add_argument("--student-hidden", type=int, nargs="+", default=[30])
    ap.add_argument("--student-epochs", type=int, default=20, help="epochs over the whole training split")
    ap.add_argument("--small-share", type=float, default=0.03, help="share of the training split in the low-data transfer set")
    ap.add_argument("--small-epochs", type=int, default=60, help="epochs over the low-data transfer set")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--harsh-sparsity", type=float, default=0.98)
    ap.add_argument("--recovery-epochs", type=int, default=None, help="part b: distill.epochs (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill_hinton.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mnist = str(Path(args.mnist).resolve())
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        root = Path(tmp)
        paths = StagePaths(root)
        base = [f"data.path={mnist}", f"train_teacher.epochs={args.teacher_epochs}", "device=cpu",
                f"train_teacher.model.hidden={args.teacher_hidden}"]
        if "b" in args.parts and args.teacher_hidden != [300, 100]:
            ap.error("part b compresses LeNet-300-100: use --teacher-hidden 300 100 or --parts a")
        if args.train_limit:
            base.append(f"data.train_limit={args.train_limit}")
        if args.recovery_epochs is not None:
            base.append(f"distill.epochs={args.recovery_epochs}")
        params = load_params(PRESET, base, root=root)
        for stage in ("data", "train_teacher"):
            run_stage(stage, params, root)
            print(f"{stage} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        splits = load_splits(paths.splits)
        X, y = splits.tensors("test")
        teacher, _ = load_model(paths.model("train_teacher"))
        teacher_err = errors(paths.model("train_teacher"), X, y)
        teacher_params = n_params(paths.model("train_teacher"))

        # ---------------------------------------------------------------- Part A
        n_small = round(len(splits.X_train) * args.small_share)
        small = dataclasses.replace(splits, X_train=splits.X_train[:n_small], y_train=splits.y_train[:n_small])
        part_a = {}
        for label, data, epochs in (("full", splits, args.student_epochs), ("small", small, args.small_epochs)):
            if "a" not in args.parts:
                break
            r = student_runs(data, teacher, args, epochs, root, X, y)
            r.update(
                transfer_images=len(data.X_train), epochs=epochs,
                scratch_summary=summary(r["scratch"]), kd_summary=summary(r["kd"]),
                gap_recovery=recovery(statistics.mean(r["scratch"]), statistics.mean(r["kd"]), teacher_err),
            )
            part_a[label] = r
            print(f"part A {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)

        # ---------------------------------------------------------------- Part B
        part_b = {}
        settings = {
            "preset": [],
            "harsh": [f"prune.sparsity={args.harsh_sparsity}", "prune.finetune.epochs=1"],
        }
        p = params
        for label, extra in settings.items():
            if "b" not in args.parts:
                break
            p = load_params(PRESET, [*base, *extra], root=root)
            for stage in ("prune", "quantize"):
                run_stage(stage, p, root)
            b = {
                "overrides": extra, "sparsity": p.prune.sparsity, "prune_finetune_epochs": p.prune.finetune.epochs,
                "quantize": p.quantize.method,
                "pruned_errors": errors(paths.model("prune"), X, y),
                "quantized_errors": errors(paths.model("quantize"), X, y),
                "quantized_bytes": paths.model("quantize").stat().st_size,
                "hard": [], "kd": [],
            }
            for seed in args.seeds:
                for name, alpha in (("hard", 0.0), ("kd", p.distill.alpha)):
                    q = load_params(PRESET, [*base, *extra, f"seed={seed}", f"distill.alpha={alpha}"], root=root)
                    out = run_stage("distill", q, root)
                    b[name].append(errors(paths.model("distill"), X, y))
                    b["recovered_bytes"] = out.model.size_bytes
                    print(f"  {label} seed {seed} {name}: {b[name][-1]} errors", flush=True)
            b["hard_summary"], b["kd_summary"] = summary(b["hard"]), summary(b["kd"])
            b["gap_recovery_kd"] = recovery(b["quantized_errors"], statistics.mean(b["kd"]), teacher_err)
            b["gap_recovery_hard"] = recovery(b["quantized_errors"], statistics.mean(b["hard"]), teacher_err)
            part_b[label] = b
            print(f"part B {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        teacher_bytes = paths.model("train_teacher").stat().st_size
        rec_cfg = {"temperature": p.distill.temperature, "alpha": p.distill.alpha,
                   "epochs": p.distill.epochs, "lr": p.distill.optimizer.lr}

    n = len(X)
    pct = lambda e: 100.0 * e / n  # noqa: E731
    result = {
        "host": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "setup": {
            "preset": "examples/mnist-lenet300/params.yaml", "teacher_epochs": args.teacher_epochs,
            "teacher_hidden": args.teacher_hidden, "parts": args.parts,
            "student_hidden": args.student_hidden, "temperature": args.temperature, "alpha": args.alpha,
            "student_optimizer": "sgd lr 0.05 momentum 0.9, batch 64", "seeds": args.seeds, "test_images": n,
            "recovery_distill": rec_cfg, "train_limit": args.train_limit,
        },
        "teacher": {"errors": teacher_err, "params": teacher_params, "bytes": teacher_bytes},
        "part_a": part_a,
        "part_b": part_b,
        "paper": PAPER,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))

    h = result["host"]
    hidden = "-".join(map(str, args.student_hidden))
    print(f"\nHost: {h['cpu']}, {h['threads']} thread(s), torch {h['torch']}; seeds {args.seeds}; errors on the "
          f"{n} MNIST test images (mean over seeds [min–max]).\n")
    print("| model | params | transfer set | epochs | errors | error % | gap recovery |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    teacher_name = "LeNet-300-100" if args.teacher_hidden == [300, 100] else "MLP 784-" + "-".join(map(str, args.teacher_hidden)) + "-10"
    print(f"| teacher {teacher_name} | {teacher_params:,} | {len(splits.X_train):,} (labels) | {args.teacher_epochs} "
          f"| {teacher_err} | {pct(teacher_err):.2f} | |")
    for r in part_a.values():
        for name in ("scratch", "kd"):
            s = r[f"{name}_summary"]
            what = "from scratch" if name == "scratch" else f"distilled T={args.temperature:g} α={args.alpha:g}"
            rec = fmt(r["gap_recovery"]) if name == "kd" else ""
            print(f"| student 784-{hidden}-10 {what} | {r['params']:,} | {r['transfer_images']:,} | {r['epochs']} "
                  f"| {s['mean']:.1f} [{s['min']}–{s['max']}] | {pct(s['mean']):.2f} | {rec} |")
    print(f"| *Hinton 2015 (2×1200 → 2×800): teacher / scratch / distilled* | | 60,000 | | "
          f"*{PAPER['teacher']} / {PAPER['scratch']} / {PAPER['kd']}* | | *{PAPER['recovery']}* |")
    if part_b:
        print_part_b(part_b, rec_cfg, teacher_bytes, teacher_err)
    shown = out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path
    print(f"\n{result['seconds']:.0f} s in all; raw figures in {shown}")


def print_part_b(part_b: dict, rec_cfg: dict, teacher_bytes: int, teacher_err: int) -> None:
    print(f"\nRecovery of the compressed LeNet-300-100 (teacher file {teacher_bytes:,} B; distill "
          f"T={rec_cfg['temperature']:g} α={rec_cfg['alpha']:g}, {rec_cfg['epochs']} epochs, lr {rec_cfg['lr']:g}):\n")
    print("| setting | file bytes | pruned | quantized | gap to teacher | + hard-label fine-tune | + distillation "
          "| gap recovery (KD / hard) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, b in part_b.items():
        hs, ks = b["hard_summary"], b["kd_summary"]
        print(f"| {label}: {b['sparsity']:.0%} sparse, {b['prune_finetune_epochs']} ep, {b['quantize']} | "
              f"{b['quantized_bytes']:,} | {b['pruned_errors']} | {b['quantized_errors']} | "
              f"{b['quantized_errors'] - teacher_err} | "
              f"{hs['mean']:.1f} [{hs['min']}–{hs['max']}] | {ks['mean']:.1f} [{ks['min']}–{ks['max']}] | "
              f"{fmt(b['gap_recovery_kd'])} / {fmt(b['gap_recovery_hard'])} |")
    print(f"(teacher: {teacher_err} errors)")


if __name__ == "__main__":
    main()
