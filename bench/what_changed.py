"""What compression changed on MNIST (LeNet-300-100): which classes pay, how many inputs flip, calibration.

    .venv/bin/python bench/what_changed.py --mnist PATH/TO/mnist [--sparsities 0.9 0.98] [--seeds 0 1 2]
    .venv/bin/python bench/what_changed.py --report-only     # tables + pictures from the saved results

For each seed, in a fresh clone of this repository's HEAD (as a new user would), runs the
product on the preset::

    shrinkflow run --params examples/mnist-lenet300/params.yaml \\
        --set data.path=PATH/TO/mnist --set seed=SEED --set prune.sparsity=S

once per sparsity S (the teacher is trained once per seed: DVC reuses it), and collects
``reports/metrics.json`` and ``reports/changes/changes.json``, i.e. what the evaluate
stage measured from the variants' files on the official 10,000-image test split. Nothing
here computes a figure itself but the mean and spread over seeds.

Prints markdown tables (per-class accuracy change of each variant, flips in each
direction, ECE after each stage), writes bench/results/what_changed_mnist.json (after
every seed, so a long run can be reported from the seeds it finished), and
draws the per-class picture (``--picture``, default docs/images/what-changed-mnist.png)
plus, from the first seed's highest-sparsity run, its student flip grid
(docs/images/what-changed-mnist-flips.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRESET = "examples/mnist-lenet300/params.yaml"
VARIANTS = ("teacher", "pruned", "quantized", "student")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    # Exit 1 with a fresh evaluate manifest = a gate failed (e.g. max_accuracy_drop at 98 %): the run is
    # complete and its reports are the data. Anything else is a failed run.
    complete = (cwd / "reports/evaluate.json").is_file() and "gate " in proc.stdout
    if proc.returncode != 0 and not (proc.returncode == 1 and complete):
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-8000:]}")


def one_seed(seed: int, sparsities: list[float], mnist: Path, env: dict[str, str], keep: Path | None, extra: list[str]) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "proj"
        subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
        # The clone's own code first: the venv's editable install points at this checkout's working tree.
        env = {**env, "PYTHONPATH": str(proj)}
        for s in sparsities:
            cmd = [str(BIN / "shrinkflow"), "run", "--params", PRESET, "--set", f"data.path={mnist}",
                   "--set", f"seed={seed}", "--set", f"prune.sparsity={s}", *[a for x in extra for a in ("--set", x)]]
            print(f"seed {seed}, sparsity {s}: {' '.join(cmd[1:])}", flush=True)
            run(cmd, proj, env)
            metrics = json.loads((proj / "reports/metrics.json").read_text())
            changes = json.loads((proj / "reports/changes/changes.json").read_text())
            gates = json.loads((proj / "reports/evaluate.json").read_text())["gates"]
            out[f"{s:g}"] = {"metrics": metrics, "changes": changes, "gates": gates}
            if keep is not None and s == sparsities[-1]:
                grid = proj / "reports/changes/images/flips_student.png"
                if grid.is_file():
                    shutil.copyfile(grid, keep)
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--report-only", action="store_true", help="no runs: report the seeds saved in --out")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="another override, e.g. data.train_limit=3000 (smoke runs)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/what_changed_mnist.json")
    ap.add_argument("--picture", type=Path, default=REPO / "docs/images/what-changed-mnist.png")
    args = ap.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env.pop("PREFECT_API_URL", None)
    flips_png = args.picture.with_name(args.picture.stem + "-flips.png")
    args.picture.parent.mkdir(parents=True, exist_ok=True)

    import torch

    from shrinkflow.measure import cpu_model

    host = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    command = "shrinkflow run --params " + PRESET + " --set data.path=PATH/TO/mnist --set seed=SEED --set prune.sparsity=S" + "".join(
        f" --set {x}" for x in args.extra)
    if args.report_only:
        saved = json.loads(args.out.read_text())
        host, args.sparsities = saved["host"], saved["sparsities"]
        runs = {int(k): v for k, v in saved["runs"].items()}
        args.seeds = sorted(runs)
    else:
        if args.mnist is None:
            ap.error("--mnist is required unless --report-only")
        runs = {}
        for seed in args.seeds:
            runs[seed] = one_seed(seed, args.sparsities, args.mnist.resolve(), env, flips_png if seed == args.seeds[0] else None, args.extra)
            result = {"host": host, "seeds": sorted(runs), "sparsities": args.sparsities, "preset": PRESET, "command": command,
                      "runs": {str(k): v for k, v in runs.items()}}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.seeds = sorted(runs)

    sp = [f"{s:g}" for s in args.sparsities]
    print(f"\nhost: {host}; seeds {args.seeds}; mean ± sample std over seeds where more than one\n")

    # ECE and accuracy after each stage.
    print("| sparsity | " + " | ".join(f"{v} acc % / ECE %" for v in VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for s in sp:
        cells = []
        for v in VARIANTS:
            acc = [100 * runs[k][s]["metrics"][v]["accuracy"] for k in args.seeds]
            ece = [100 * runs[k][s]["metrics"][v]["ece"] for k in args.seeds]
            cells.append(f"{statistics.mean(acc):.2f} / {statistics.mean(ece):.2f}" + (f" (±{statistics.stdev(ece):.2f})" if len(ece) > 1 else ""))
        print(f"| {float(s):.0%} | " + " | ".join(cells) + " |")

    # Flips in each direction.
    print("\n| sparsity | variant | newly wrong | newly right | both wrong, changed | agreement % |\n|---|---|---|---|---|---|")
    for s in sp:
        for v in VARIANTS[1:]:
            ch = [runs[k][s]["changes"]["variants"][v] for k in args.seeds]
            mean = lambda key, ch=ch: statistics.mean(c[key] for c in ch)  # noqa: E731
            print(f"| {float(s):.0%} | {v} | {mean('newly_wrong'):.1f} | {mean('newly_right'):.1f} | "
                  f"{mean('both_wrong_changed'):.1f} | {100 * mean('agreement'):.2f} |")

    # Which classes paid.
    classes = list(range(10))
    print("\n| class | n | teacher acc % | " + " | ".join(f"{v} Δ pp @ {float(s):.0%}" for s in sp for v in ("pruned", "student")) + " |")
    print("|---" * (3 + 2 * len(sp)) + "|")
    per_class: dict[str, dict[str, list[list[float]]]] = {s: {v: [] for v in VARIANTS[1:]} for s in sp}
    for s in sp:
        for v in VARIANTS[1:]:
            per_class[s][v] = [[100 * r["delta"] for r in runs[k][s]["changes"]["variants"][v]["per_class"]] for k in args.seeds]
    first = runs[args.seeds[0]][sp[0]]["changes"]["variants"]["teacher"]["per_class"]
    for c in classes:
        t_acc = statistics.mean(100 * runs[k][sp[0]]["changes"]["variants"]["teacher"]["per_class"][c]["teacher_accuracy"] for k in args.seeds)
        cells = [spread([row[c] for row in per_class[s][v]]) for s in sp for v in ("pruned", "student")]
        print(f"| {c} | {first[c]['n']:,} | {t_acc:.2f} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    bars = [(s, v) for s in sp for v in ("pruned", "student")]
    width = 0.8 / len(bars)
    colors = {"pruned": ("#9ecae1", "#08519c"), "student": ("#fdae6b", "#a63603")}
    for j, (s, v) in enumerate(bars):
        means = [statistics.mean(row[c] for row in per_class[s][v]) for c in classes]
        xs = [c + (j - (len(bars) - 1) / 2) * width for c in classes]
        ax.bar(xs, means, width=width, color=colors[v][sp.index(s) % 2], label=f"{v}, {float(s):.0%} sparse")
        if v == "student":  # the average the metrics table reports, for scale
            avg = statistics.mean(100 * (runs[k][s]["metrics"][v]["accuracy"] - runs[k][s]["metrics"]["teacher"]["accuracy"]) for k in args.seeds)
            ax.axhline(avg, color=colors[v][sp.index(s) % 2], linestyle="--", linewidth=1, label=f"student, {float(s):.0%}: all classes")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(classes)
    ax.set_xlabel("MNIST class")
    ax.set_ylabel("accuracy change vs teacher (pp)")
    seeds = f"mean of {len(args.seeds)} seeds" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    ax.set_title(f"LeNet-300-100: which classes paid for the compression ({seeds}, 10,000 test images)", fontsize=10)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(args.picture, dpi=100)
    print(f"\nwrote {args.out}, {args.picture}" + (f", {flips_png}" if flips_png.is_file() else ""))


if __name__ == "__main__":
    main()
