"""The compression frontier on MNIST: whole-file ratio vs test-error change, per method, 3 seeds.

    .venv/bin/python bench/frontier.py --mnist PATH/TO/mnist                       # both nets, every config, seeds 0 1 2
    .venv/bin/python bench/frontier.py --mnist PATH/TO/mnist --nets lenet300 --configs vd-auto --seeds 0
    .venv/bin/python bench/frontier.py --merge A.json B.json              # join runs made side by side, print, plot

Runs presets through the stage entry point every front door calls
(``tasks.run.run_stage``, what ``dvc repro`` and ``shrinkflow run`` execute), once
per seed in a fresh project folder, with ``--set``-style overrides:

- ``dc``: ``examples/deep-compression-<net>`` as it is (magnitude pruning to the
  paper's per-layer densities, k-means at the paper's widths);
- ``dc-auto``: the same with k-means ``bits: auto`` (budget 0.1 pp, as the max presets);
- ``vd``: ``examples/max-<net>`` with k-means at Deep Compression's widths;
- ``vd-auto``: ``examples/max-<net>`` as it is (variational, ``bits: auto``).

The max presets share the Deep Compression presets' data and teacher sections, so
every point of a seed is measured against the same teacher file. Every config keeps
its preset's dead-unit removal and ``evaluate.pack_precision: predictions``. A stage
whose params did not change since the previous config in the same folder is not run
again (the teacher is shared by all configs of a seed, the pruned model by ``dc`` /
``dc-auto`` and by ``vd`` / ``vd-auto``), as DVC's cache would skip it.

Size is the packed student file (``models/evaluate/student.sfz``), the ratio is the
teacher's own fp32 ``.pt`` file over it, and errors are measured on the MNIST test
split (10,000 images) by loading those files (``reports/metrics.json``). Writes every
run to ``bench/results/frontier.json`` as it finishes, prints markdown tables and
draws ``bench/results/frontier.png`` (ratio vs error change) and
``bench/results/frontier_curves.png`` (the variational training's validation
accuracy and sparsity per epoch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from presets import write_results  # noqa: E402

from schemas.paths import STAGES, StagePaths  # noqa: E402
from shrinkflow.config import load_params  # noqa: E402
from shrinkflow.measure import cpu_model  # noqa: E402
from tasks.run import run_stage  # noqa: E402

MAX = {"lenet300": "examples/max-lenet300/params.yaml", "lenet5": "examples/max-lenet5/params.yaml"}
DC = {"lenet300": "examples/deep-compression-lenet300/params.yaml", "lenet5": "examples/deep-compression-lenet5/params.yaml"}
TARGETS = {"lenet300": 100.0, "lenet5": 300.0}
#: Deep Compression's widths (6 bits; LeNet-5 8-bit conv, 5-bit fc) and the max presets' budget for bits: auto.
DC_BITS = {"lenet300": ["quantize.bits=6", "quantize.layer_bits={}"],
           "lenet5": ["quantize.layer_bits={features.*: 8, classifier.*: 5}"]}
AUTO = ["quantize.bits=auto", "quantize.layer_bits={}", "quantize.auto_budget=0.001"]
CONFIGS = ("dc", "dc-auto", "vd", "vd-auto")
LABELS = {
    "dc": "magnitude: Deep Compression preset",
    "dc-auto": "magnitude: Deep Compression preset, k-means bits: auto",
    "vd": "variational, k-means at Deep Compression's widths",
    "vd-auto": "variational, k-means bits: auto (the max preset)",
}
RESULTS = ROOT / "bench/results"


def preset(net: str, config: str) -> tuple[str, list[str]]:
    """(the preset, its overrides) of a point of the frontier."""
    if config == "dc":
        return DC[net], []
    if config == "dc-auto":
        return DC[net], AUTO
    if config == "vd":
        return MAX[net], DC_BITS[net]
    return MAX[net], []


def _sections(params, stage: str) -> str:
    """What a stage's result depends on in the params (its section, seed, data and upstream sections)."""
    chain = list(STAGES[: STAGES.index(stage) + 1])
    return json.dumps({k: getattr(params, k).model_dump(mode="json") for k in chain} | {"seed": params.seed}, sort_keys=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _curve(root: Path) -> list[dict[str, float]]:
    """The prune stage's per-epoch rows (dvclive: reports/live/prune/plots/metrics/*.tsv)."""
    folder = root / "reports/live/prune/plots/metrics"
    rows: dict[int, dict[str, float]] = {}
    for tsv in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        lines = tsv.read_text().splitlines()
        for line in lines[1:]:
            step, value = line.split("\t")[:2]
            rows.setdefault(int(step), {})[tsv.stem] = float(value)
    return [{"epoch": s + 1, **v} for s, v in sorted(rows.items())]


def run_seed(net: str, seed: int, configs: list[str], mnist: Path, out: list[dict], save) -> None:
    with tempfile.TemporaryDirectory(prefix=f"frontier-{net}-{seed}-") as tmp:
        root = Path(tmp)
        done: dict[str, str] = {}
        for config in configs:
            file, extra = preset(net, config)
            params = load_params(ROOT / file, [f"data.path={mnist}", f"seed={seed}", *extra], root=root)
            times: dict[str, dict[str, float]] = {}
            for stage in STAGES:
                key = _sections(params, stage)
                if done.get(stage) == key:
                    continue
                wall, cpu = time.perf_counter(), _cpu()
                run_stage(stage, params, root)
                times[stage] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu() - cpu, 1)}
                done[stage] = key
                for later in STAGES[STAGES.index(stage) + 1 :]:
                    done.pop(later, None)
            paths = StagePaths(root)
            metrics = json.loads(paths.metrics.read_text())
            pack = json.loads(paths.pack_summary.read_text())
            prune = json.loads(paths.manifest("prune").read_text())
            quantize = json.loads(paths.manifest("quantize").read_text())
            teacher, student = metrics["teacher"], metrics["student"]
            row = {
                "net": net, "config": config, "seed": seed, "preset": file, "overrides": extra,
                "command": f"shrinkflow run --params {file} --set data.path=PATH/TO/mnist --set seed={seed}"
                + "".join(f" --set '{o}'" for o in extra),
                "teacher_bytes": teacher["size_bytes"], "teacher_error_pct": 100 * (1 - teacher["accuracy"]),
                "student_bytes": student["size_bytes"], "ratio": student["compression_ratio"],
                "error_pct": 100 * (1 - student["accuracy"]),
                "delta_pp": 100 * (teacher["accuracy"] - student["accuracy"]),
                "agreement": student["agreement"], "nonzero_params": student["nonzero_params"], "params": student["params"],
                "pruned_val": prune["val_metric"], "dead_units": prune.get("dead_units"), "bits": quantize.get("bits"),
                "bit_sensitivity": quantize.get("bit_sensitivity"),
                "breakdown": pack["breakdown"], "rounded": pack["rounded"], "tensors": pack["tensors"],
                "curve": _curve(root) if "prune" in times and config.startswith("vd") else None,
                "times": times,
            }
            out.append(row)
            save()
            print(f"{net} {config} seed {seed}: {row['student_bytes']:,} B, {row['ratio']:.1f}×, "
                  f"error {row['error_pct']:.2f} % ({row['delta_pp']:+.2f} pp), bits {row['bits']}", flush=True)


def table(rows: list[dict]) -> str:
    lines = []
    for net in dict.fromkeys(r["net"] for r in rows):
        lines += [f"\n{net} (whole-file ratio vs the teacher's fp32 .pt; test error, MNIST t10k, loaded from the file)\n",
                  "| config | seeds | file bytes | ratio | error % | Δ pp vs teacher | bits |", "|---|---|---|---|---|---|---|"]
        for config in CONFIGS:
            rs = [r for r in rows if r["net"] == net and r["config"] == config]
            if not rs:
                continue
            ratios = [r["ratio"] for r in rs]
            deltas = [r["delta_pp"] for r in rs]
            seeds = ", ".join(str(r["seed"]) for r in rs)
            sizes = " / ".join(f"{r['student_bytes']:,}" for r in rs)
            errors = " / ".join(f"{r['error_pct']:.2f}" for r in rs)
            bits = " / ".join(",".join(str(b) for b in (r["bits"] or {}).values()) for r in rs)
            lines.append(
                f"| {LABELS[config]} | {seeds} | {sizes} | "
                f"{statistics.mean(ratios):.1f}× ({min(ratios):.1f}–{max(ratios):.1f}) | {errors} | "
                f"{statistics.mean(deltas):+.2f} ({min(deltas):+.2f}…{max(deltas):+.2f}) | {bits} |"
            )
        sections = list(dict.fromkeys(k for r in rows if r["net"] == net for k, v in r["breakdown"].items() if v))
        lines += [f"\n{net}: bytes per section of the packed file (mean over seeds)\n",
                  "| config | " + " | ".join(sections) + " | total |", "|---|" + "---|" * (len(sections) + 1)]
        for config in CONFIGS:
            rs = [r for r in rows if r["net"] == net and r["config"] == config]
            if rs:
                lines.append(f"| {LABELS[config]} | " + " | ".join(f"{statistics.mean(r['breakdown'][k] for r in rs):,.0f}" for k in sections)
                             + f" | {statistics.mean(r['student_bytes'] for r in rs):,.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["net"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    markers = {"dc": "s", "dc-auto": "D", "vd": "o", "vd-auto": "*"}
    for ax, net in zip(axes[0], nets, strict=True):
        for i, config in enumerate(CONFIGS):
            rs = [r for r in rows if r["net"] == net and r["config"] == config]
            if not rs:
                continue
            ax.scatter([r["ratio"] for r in rs], [r["delta_pp"] for r in rs], marker=markers[config], s=60, alpha=0.35, color=f"C{i}")
            ax.scatter([statistics.mean(r["ratio"] for r in rs)], [statistics.mean(r["delta_pp"] for r in rs)],
                       marker=markers[config], s=120, label=LABELS[config], edgecolors="black", color=f"C{i}")
        ax.axhline(0.1, color="red", linestyle="--", linewidth=1, label="+0.1 pp")
        ax.axvline(TARGETS[net], color="gray", linestyle=":", linewidth=1, label=f"{TARGETS[net]:.0f}× target")
        ax.set_xscale("log")
        ax.set_xlabel("whole-file compression ratio (teacher .pt / packed .sfz)")
        ax.set_ylabel("test error change vs teacher (pp)")
        ax.set_title(f"{net}: mean (large) and seeds (small)")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r.get("curve")]
    if not curves:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in curves:
        label = f"{r['net']} seed {r['seed']}"
        ep = [c["epoch"] for c in r["curve"]]
        a1.plot(ep, [100 * c.get("val_metric", float("nan")) for c in r["curve"]], marker="o", label=label)
        a2.plot(ep, [100 * c.get("sparsity", float("nan")) for c in r["curve"]], marker="o", label=label)
    a1.set_xlabel("epoch of variational training")
    a1.set_ylabel("validation accuracy % (deterministic)")
    a2.set_xlabel("epoch of variational training")
    a2.set_ylabel("weights above log α 3 (%)")
    a1.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", type=Path, help="Folder with the four MNIST IDX .gz files (required unless --merge).")
    ap.add_argument("--nets", nargs="+", default=list(MAX), choices=list(MAX))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "frontier.json")
    ap.add_argument("--append", action="store_true", help="Keep the runs already in --out (others' nets/configs/seeds).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (1: steady on a shared CPU).")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="No run: join these results files (e.g. one per net, run side by side) into --out, then print and plot.")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["runs"]]
        write_results(args.out, {"hosts": [part.get("host") or part.get("hosts") for part in parts], "runs": rows})
        print(table(rows))
        plot(rows, args.out.with_suffix(".png"))
        plot_curves(rows, args.out.with_name(args.out.stem + "_curves.png"))
        return
    if args.mnist is None:
        ap.error("--mnist is required (the folder with the four MNIST IDX .gz files)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    rows: list[dict] = []
    if args.append and args.out.exists():
        rows = json.loads(args.out.read_text())["runs"]
    host = {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "load_average_at_start": os.getloadavg()[0],
        "command": f"bench/frontier.py --mnist MNIST_DIR --nets {' '.join(args.nets)} --configs {' '.join(args.configs)} "
        f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads}",
    }

    def save() -> None:
        write_results(args.out, {"host": host, "runs": rows})

    for net in args.nets:
        for seed in args.seeds:
            rows = [r for r in rows if not (r["net"] == net and r["seed"] == seed and r["config"] in args.configs)]
            run_seed(net, seed, list(args.configs), args.mnist.resolve(), rows, save)
    print(table(rows))
    plot(rows, args.out.with_suffix(".png"))
    plot_curves(rows, args.out.with_name(args.out.stem + "_curves.png"))


if __name__ == "__main__":
    main()
