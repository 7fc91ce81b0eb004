"""Sweep search quality and early stopping, through `shrinkflow sweep` on MNIST (LeNet-300-100).

    .venv/bin/python bench/sweep_search.py --mnist PATH --baseline-src DIR [--seeds 0 1 2] [--trials 8] [--oracle]
    .venv/bin/python bench/sweep_search.py --mnist PATH --part early

**quality**: one MNIST sweep (``SPACE`` below: sparsity x quantization, 24 points; criterion
1 pp of accuracy vs the trial's teacher; objective: file size) at an equal budget
(``budget.trials`` and ``budget.seconds``), searched by

- ``optuna-auto``: ``search.mode: auto`` of this checkout (Optuna TPE, the criterion as a constraint);
- ``old-auto``: ``search.mode: auto`` of the hand-written searcher it replaced, run from
  ``--baseline-src``, a checkout of that version (``git worktree add DIR 46f5969``), on a
  project made of that version's pipeline (its dvc.yaml, params and stage code: the
  current dvc.yaml declares outputs its stages do not write) with the same data and
  settings, and a teacher of its own;
- ``random``: ``search.mode: random`` (Optuna's RandomSampler), ``trials`` = the budget;

each over the search seeds. Reported: the chosen model's size (bytes of its file), its
accuracy drop, how many trials passed, and the sweep's seconds. ``--oracle`` adds a grid
sweep over the whole space: the smallest passing size there is.

**early**: a grid of sparsities of which the highest cannot meet the criterion, run
serially (1 worker) with ``early_stop`` on and off: sweep seconds, trial seconds, and the
sweep's own estimate of the time saved.

Every sweep runs in its own copy of a project whose DVC cache holds only the prepared
data and the teacher (trained once, up front), so no sweep restores another's trials
from the run-cache. Writes bench/results/sweep_search.json and prints markdown tables.
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
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from presets import write_results  # noqa: E402
from sweep_throughput import fresh_project  # noqa: E402

from shrinkflow.measure import cpu_model  # noqa: E402

SPACE = {
    "prune.sparsity": [0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99],
    "quantize": [{"method": "dynamic"}, {"method": "kmeans", "bits": 5}, {"method": "kmeans", "bits": 4}],
}
EARLY_SPACE = {"prune.sparsity": [0.9, 0.95, 0.99, 0.995, 0.998, 0.999]}
FIXED = {"evaluate.batch_sizes": [1], "evaluate.min_run_time": 0.05}
CRITERION = {"max_drop": 0.01}


def base_project(tmp: Path, overrides: list[str], src: Path | None = None) -> Path:
    """A project with data and teacher in its DVC cache (what every sweep copy starts from), made of the
    pipeline (dvc.yaml, params, stage code) of the checkout at ``src`` (default: this one): another
    version's runner needs its own stages, whose outputs its dvc.yaml declares."""
    proj = fresh_project(tmp / ("base" if src is None else "base-baseline"), overrides, src or ROOT)
    env = dict(os.environ, PYTHONPATH=str(src or ROOT))
    subprocess.run([sys.executable, "-m", "dvc", "repro", "train_teacher"], cwd=proj, check=True, capture_output=True, env=env)
    return proj


def run_sweep(base: Path, tmp: Path, name: str, sweep: dict, workers: int, src: Path | None = None) -> dict:
    """``shrinkflow sweep`` (this checkout, or the one at ``src``) on a fresh copy of ``base``."""
    proj = tmp / name
    shutil.copytree(base, proj, symlinks=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **sweep}, sort_keys=False))
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
    env["PYTHONPATH"] = str(src or ROOT)
    cmd = [sys.executable, "-m", "shrinkflow.cli", "sweep", str(path), "--root", str(proj), "--workers", str(workers)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    # Run from the code's own folder: `python -m` puts the working directory first on sys.path,
    # and the project copy holds this checkout's code, which would shadow the baseline's.
    proc = subprocess.run(cmd, cwd=src or ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    summary_file = proj / "sweeps" / name / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"{name}: no summary (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    import csv

    rows = list(csv.DictReader((proj / "sweeps" / name / "results.csv").open()))
    chosen = summary["chosen"]
    out = {
        "sweep": name,
        "trials": summary["trials"],
        "passed": sum(r.get("passed") == "True" for r in rows),
        "pruned": sum(r["status"] == "pruned" for r in rows),
        "chosen_size_bytes": int(chosen["objective_value"]) if chosen else None,
        "chosen_drop": round(chosen["drop"], 5) if chosen else None,
        "chosen_point": chosen["point"] if chosen else None,
        "sweep_seconds": summary["seconds"],
        "total_seconds": round(total, 1),
        "trial_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        "saved_seconds_estimate": summary.get("saved_seconds"),
        "points": [{k: r[k] for k in [*sweep["space"], "status", "size_bytes", "drop", "seconds"] if k in r} for r in rows],
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    shutil.rmtree(proj, ignore_errors=True)
    return out


def save(args, host: dict, results: dict) -> None:
    """Write what is measured so far (a long bench interrupted keeps its finished sweeps)."""
    write_results(args.out, {"host": host, **results})


def quality(args, base: Path, tmp: Path, keep, overrides: list[str]) -> dict:
    budget = {"trials": args.trials, "seconds": args.seconds}
    common = {"set": FIXED, "space": SPACE, "criterion": CRITERION, "objective": "size", "budget": budget}
    runs = []
    bases: dict[Path, Path] = {}  # baseline checkout -> its base project
    for seed in args.seeds:
        configs = [
            ("optuna-auto", {"search": {"mode": "auto", "seed": seed}}, None),
            ("random", {"search": {"mode": "random", "trials": args.trials, "seed": seed}}, None),
        ]
        if args.baseline_src:
            configs.insert(1, ("old-auto", {"search": {"mode": "auto", "seed": seed}}, args.baseline_src.resolve()))
        for method, search, src in configs:
            if args.methods and method not in args.methods:
                continue
            if src is not None and src not in bases:
                print("training the baseline version's teacher ...", flush=True)
                bases[src] = base_project(tmp, overrides, src)
            print(f"quality: {method} seed {seed} ...", flush=True)
            r = run_sweep(bases.get(src, base), tmp, f"{method}-s{seed}", {**common, **search}, args.workers, src)
            runs.append({"method": method, "seed": seed, **r})
            keep({"runs": runs})
            print(f"  chosen {r['chosen_size_bytes']} bytes ({r['chosen_point']}), {r['passed']}/{r['trials']} passed, "
                  f"{r['sweep_seconds']:.0f} s", flush=True)
    oracle = None
    if args.oracle:
        print("quality: oracle grid over the whole space ...", flush=True)
        oracle = run_sweep(base, tmp, "oracle-grid", {**common, "budget": {}, "search": {"mode": "grid"}}, args.workers)
    keep({"runs": runs, "oracle": oracle})
    return {"runs": runs, "oracle": oracle}


def early(args, base: Path, tmp: Path, keep) -> dict:
    common = {"set": FIXED, "space": EARLY_SPACE, "criterion": CRITERION, "objective": "size", "search": {"mode": "grid"}}
    out = {}
    for on in (True, False):
        name = f"early-{'on' if on else 'off'}"
        print(f"early: {name} ...", flush=True)
        out[name] = run_sweep(base, tmp, name, {**common, "early_stop": {"enabled": on, "margin": 0.05}}, workers=1)
        keep(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", type=Path, required=True, help="MNIST folder (four IDX .gz files).")
    ap.add_argument("--train-limit", type=int, default=10000, help="MNIST training images used.")
    ap.add_argument("--baseline-src", type=Path, default=None, help="Checkout of the pre-Optuna version (old auto).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=8, help="budget.trials of every quality sweep.")
    ap.add_argument("--seconds", type=float, default=1800, help="budget.seconds of every quality sweep.")
    ap.add_argument("--workers", type=int, default=2, help="Dask workers of the quality sweeps.")
    ap.add_argument("--oracle", action="store_true", help="Also run the whole space as a grid.")
    ap.add_argument("--part", choices=["quality", "early", "both"], default="both")
    ap.add_argument("--methods", nargs="+", choices=["optuna-auto", "old-auto", "random"], help="Quality: only these searches.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_search.json")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    overrides = ["data.source=mnist", f"data.path={json.dumps(str(args.mnist.resolve()))}", f"data.train_limit={args.train_limit}",
                 "train_teacher.epochs=5", "train_teacher.model.hidden=[300, 100]", "prune.finetune.epochs=2", "distill.epochs=2"]
    import torch

    host = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "overrides": overrides,
            "space": SPACE, "early_space": EARLY_SPACE, "criterion": CRITERION, "trials": args.trials,
            "seconds": args.seconds, "workers": args.workers}
    results: dict = {}

    def keeper(part: str):
        def keep(value: dict) -> None:
            results[part] = value
            save(args, host, results)
        return keep

    with tempfile.TemporaryDirectory(prefix="sweep-search-") as t:
        tmp = Path(t)
        print("training the shared teacher ...", flush=True)
        base = base_project(tmp, overrides)
        if args.part in ("early", "both"):
            results["early"] = early(args, base, tmp, keeper("early"))
        if args.part in ("quality", "both"):
            results["quality"] = quality(args, base, tmp, keeper("quality"), overrides)
    save(args, host, results)
    print(f"\nHost: {host['cpu']}, {host['cpus']} CPUs, torch {host['torch']}")
    if "quality" in results:
        q = results["quality"]
        print(f"\nChosen model size (bytes) at {args.trials} trials / {args.seconds:g} s, {args.workers} workers:\n")
        print("| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | passing trials | mean sweep s |")
        print("|---" * (len(args.seeds) + 4) + "|")
        for m in dict.fromkeys(r["method"] for r in q["runs"]):
            rs = [r for r in q["runs"] if r["method"] == m]
            sizes = [r["chosen_size_bytes"] for r in rs]
            known = [s for s in sizes if s is not None]
            mean = f"{statistics.mean(known):,.0f}" if len(known) == len(sizes) else "–"
            print(f"| {m} | " + " | ".join(f"{s:,}" if s else "none" for s in sizes)
                  + f" | {mean} | {sum(r['passed'] for r in rs)}/{sum(r['trials'] for r in rs)}"
                  + f" | {statistics.mean(r['sweep_seconds'] for r in rs):.0f} |")
        if q["oracle"]:
            o = q["oracle"]
            print(f"\noracle (grid, {o['trials']} trials): smallest passing {o['chosen_size_bytes']:,} bytes {o['chosen_point']}")
    if "early" in results:
        e = results["early"]
        print("\n| early_stop | trials | pruned | sweep s | trial s | estimated saving s |\n|---|---|---|---|---|---|")
        for name, r in e.items():
            print(f"| {name} | {r['trials']} | {r['pruned']} | {r['sweep_seconds']:.1f} | {r['trial_seconds']:.1f} | "
                  f"{r['saved_seconds_estimate']} |")
        on, off = e["early-on"], e["early-off"]
        print(f"\nmeasured saving: {off['sweep_seconds'] - on['sweep_seconds']:.1f} s of sweep time "
              f"({1 - on['sweep_seconds'] / off['sweep_seconds']:.0%}), {off['trial_seconds'] - on['trial_seconds']:.1f} trial-seconds")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
