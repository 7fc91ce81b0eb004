"""Hinton et al. 2015 on MNIST, and distillation as recovery of a compressed LeNet-300-100,
through the product.

    .venv/bin/python bench/distill_hinton.py --mnist PATH/TO/mnist [--seeds 0 1 2] [--parts a b]

Every run is a preset by `dvc repro` in a fresh clone; clones share one DVC cache, so a
teacher (or a pruned/quantized model) already made with the same data, params and code is
restored from the run-cache. Errors are on the MNIST test split (10,000 images), measured
by loading the model file; seeds vary the whole chain (split, teacher, student).

**Part A (Hinton's MNIST row, scaled to a CPU).** ``examples/distill-mnist-student``: a
784-30-10 student from a LeNet-300-100 teacher, soft targets at T = 4, alpha = 0.9; from
scratch = the same run with ``distill.alpha=0`` (the hard-label cross-entropy alone). Two
transfer sets: the whole training split (20 epochs), and its first 3 %
(``distill.transfer_limit=1620``, 60 epochs). Gap recovery = (err_scratch − err_kd) /
(err_scratch − err_teacher), from the mean errors.

**Part B (recovery).** ``examples/mnist-lenet300`` at 98 % sparsity (1 fine-tuning epoch)
+ dynamic int8, then its distill stage (``student: compressed``: the zeros and the int8 grid
are kept) against the same stage with ``distill.alpha=0`` (hard-label fine-tuning of the same
compressed model, same budget), for ``--recovery-epochs`` (default 2 and 10).

Writes bench/results/distill_hinton.json and prints markdown tables.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from presets import host, mean_se, parser, run_preset, write_results

STUDENT = "examples/distill-mnist-student/params.yaml"
RECOVERY = "examples/mnist-lenet300/params.yaml"
#: Hinton et al. 2015, §3: test errors out of 10,000 (teacher 2×1200 with dropout and
#: jittered inputs, student 2×800 without regularization; full transfer set).
PAPER = {"teacher": 67, "scratch": 146, "kd": 74}


def errors(accuracy: float) -> float:
    return round(10_000 * (1.0 - accuracy))


def gap(base: float, kd: float, teacher: float) -> float | None:
    return (base - kd) / (base - teacher) if base != teacher else None


def part_a(args, common, workdir) -> dict:
    out = {}
    for label, sets in (("full", [f"distill.epochs={args.student_epochs}"]),
                        ("3%", [f"distill.transfer_limit={args.small_n}", f"distill.epochs={args.small_epochs}"])):
        rows = {"scratch": [], "kd": [], "teacher": []}
        for seed in args.seeds:
            for name, alpha in (("scratch", 0.0), ("kd", None)):
                over = [*common, f"seed={seed}", *sets, *([f"distill.alpha={alpha}"] if alpha is not None else [])]
                run = run_preset(STUDENT, over, workdir, cache_dir=workdir / "cache", name=f"a-{label.strip('%')}-{name}-{seed}")
                rows[name].append(errors(run.metrics["student"].accuracy))
                if name == "kd":
                    rows["teacher"].append(errors(run.metrics["teacher"].accuracy))
                    rows.setdefault("command", run.command)
                    rows["student_params"] = run.metrics["student"].params
                print(f"A {label} seed {seed} {name}: {rows[name][-1]} errors", flush=True)
        t = statistics.mean(rows["teacher"])
        rows["gap_recovery"] = gap(statistics.mean(rows["scratch"]), statistics.mean(rows["kd"]), t)
        out[label] = rows
    return out


def part_b(args, common, workdir) -> dict:
    out = {}
    base = [*common, "prune.sparsity=0.98", "prune.finetune.epochs=1", "evaluate.pack=none"]
    for epochs in args.recovery_epochs:
        rows = {"hard": [], "kd": [], "quantized": [], "teacher": []}
        for seed in args.seeds:
            for name, alpha in (("hard", 0.0), ("kd", None)):
                over = [*base, f"seed={seed}", f"distill.epochs={epochs}", *([f"distill.alpha={alpha}"] if alpha is not None else [])]
                run = run_preset(RECOVERY, over, workdir, cache_dir=workdir / "cache", name=f"b-{epochs}-{name}-{seed}")
                rows[name].append(errors(run.metrics["student"].accuracy))
                if name == "kd":
                    rows["quantized"].append(errors(run.metrics["quantized"].accuracy))
                    rows["teacher"].append(errors(run.metrics["teacher"].accuracy))
                    rows["bytes"] = run.metrics["student"].size_bytes
                    rows.setdefault("command", run.command)
                print(f"B {epochs} epochs seed {seed} {name}: {rows[name][-1]} errors", flush=True)
        q, t = statistics.mean(rows["quantized"]), statistics.mean(rows["teacher"])
        rows["gap_recovery_kd"] = gap(q, statistics.mean(rows["kd"]), t)
        rows["gap_recovery_hard"] = gap(q, statistics.mean(rows["hard"]), t)
        out[str(epochs)] = rows
    return out


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> None:
    ap = parser(__doc__, "distill_hinton.json", seeds=[0, 1, 2])
    ap.add_argument("--parts", nargs="+", choices=["a", "b"], default=["a", "b"])
    ap.add_argument("--student-epochs", type=int, default=20)
    ap.add_argument("--small-n", type=int, default=1620, help="part A: the low-data transfer set (3 %% of 54,000)")
    ap.add_argument("--small-epochs", type=int, default=60)
    ap.add_argument("--recovery-epochs", type=int, nargs="+", default=[2, 10])
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distill-hinton-"))
    common = [f"data.path={args.mnist.resolve()}", *args.extra]
    h = host()
    result = {"host": h, "paper": PAPER, "seeds": args.seeds}
    if "a" in args.parts:
        result["a"] = part_a(args, common, workdir)
    if "b" in args.parts:
        result["b"] = part_b(args, common, workdir)
    write_results(args.out, result)
    if "a" in result:
        print("\n| transfer set | teacher errors | scratch | distilled | gap recovery |\n|---|---|---|---|---|")
        for label, r in result["a"].items():
            s, k, t = (mean_se(r[x]) for x in ("scratch", "kd", "teacher"))
            print(f"| {label} | {t[0]:.1f} | {s[0]:.1f} ± {s[1]:.1f} | {k[0]:.1f} ± {k[1]:.1f} | {fmt(r['gap_recovery'])} |")
        print(f"| Hinton et al. 2015 | {PAPER['teacher']} | {PAPER['scratch']} | {PAPER['kd']} | "
              f"{fmt(gap(PAPER['scratch'], PAPER['kd'], PAPER['teacher']))} |")
    if "b" in result:
        print("\n| recovery epochs | teacher | compressed (98 % + int8) | hard-label | distilled | gap recovery (hard / distilled) |")
        print("|---|---|---|---|---|---|")
        for epochs, r in result["b"].items():
            hd, k, q, t = (mean_se(r[x]) for x in ("hard", "kd", "quantized", "teacher"))
            print(f"| {epochs} | {t[0]:.1f} | {q[0]:.1f} | {hd[0]:.1f} ± {hd[1]:.1f} | {k[0]:.1f} ± {k[1]:.1f} | "
                  f"{fmt(r['gap_recovery_hard'])} / {fmt(r['gap_recovery_kd'])} |")
    print(f"\nhost: {h}\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
