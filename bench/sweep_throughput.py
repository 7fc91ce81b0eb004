"""Sweep throughput on Dask: 2 external workers vs serial, and what reusing the teacher saves.

    .venv/bin/python bench/sweep_throughput.py [--trials 4] [--mnist PATH --train-limit 10000] [--local]

Each configuration runs the same grid sweep (``prune.sparsity`` × N values, all sharing
one teacher) through ``shrinkflow sweep``'s flow, in a fresh copy of this project (fresh
git + DVC repo and cache, so nothing is reused across configurations), against an
external cluster: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 started
for that configuration (``--local``: a LocalCluster instead), their task runs reported to
one ``prefect server`` started for the bench:

- ``serial``: 1 Dask worker, each trial's stages use every core (OMP threads = CPUs);
- ``parallel``: 2 Dask workers, each trial's stages use CPUs / 2 threads;
- ``parallel_no_reuse``: 2 workers, ``reuse_teacher: false`` (every trial trains its
  own teacher in a private cache).

Reported: sweep wall time inside the flow (from the first submission to the last result;
Prefect/Dask start-up, ~10–20 s, is reported separately), trials per minute, the speedup
of ``parallel`` over ``serial`` (target ≥ 1.6× for trials of ≥ 10 s) and the saving of
teacher reuse. Trials must take ≥ 10 s; the default data (digits, 30 teacher epochs) does
on this project. On a shared machine the figures move with the other load: the script
records the 1-minute load average before and after each configuration.
Writes bench/results/sweep_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from presets import write_results  # noqa: E402

from flows.ops.trials import project_files  # noqa: E402
from shrinkflow.measure import cpu_model  # noqa: E402

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]




def fresh_project(dest: Path, overrides: list[str], src: Path = ROOT) -> Path:
    """A copy of the pipeline of the checkout at ``src`` (default: this one) in a new git + DVC repo (its own,
    empty cache)."""
    from shrinkflow.config import apply_to_params_file

    for rel in project_files(src):
        if rel.parts[0] in ("shrinkflow", "tasks", "schemas", "flows") or rel.as_posix() in ("dvc.yaml", "params.yaml", ".gitignore", "data/raw/README.md"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    (dest / "data" / "raw").mkdir(parents=True, exist_ok=True)
    with (dest / ".gitignore").open("a") as f:
        f.write("\n/data/prepared/\n/models/\n/reports/\n/sweeps/\n__pycache__/\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@invalid", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@invalid")
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    apply_to_params_file(dest / "params.yaml", overrides=overrides)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=dest, check=True, env=env)
    return dest


@contextmanager
def dask_cluster(workers: int, tmp: Path) -> Iterator[str]:
    """``dask scheduler`` + ``workers`` single-threaded ``dask worker`` processes on 127.0.0.1; its address."""
    from flows.ops import serve
    from flows.ops.sweep import wait_for_workers

    port = serve.free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp / f"dask-{port}"
    dask = str(Path(sys.executable).parent / "dask")
    procs = [serve._spawn([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], dict(os.environ),
                          logs / "scheduler.log")]
    try:
        for i in range(workers):
            procs.append(serve._spawn([dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                      dict(os.environ), logs / f"worker{i}.log"))
        wait_for_workers(address, workers)
        yield address
    finally:
        for p in reversed(procs):
            serve.stop(p, grace=10)


def run_config(
    name: str, workers: int, threads: int, reuse: bool, trials: int, overrides: list[str], tmp: Path, local: bool = False
) -> dict:
    from flows.sweep import run_sweep

    proj = fresh_project(tmp / name, overrides)
    sweep = {
        "name": name,
        "set": {"evaluate.batch_sizes": [1], "evaluate.min_run_time": 0.1},
        "space": {"prune.sparsity": SPARSITIES[:trials]},
        "criterion": {"max_drop": 0.02},
        "cluster": {"workers": workers, "threads_per_trial": threads},
        "reuse_teacher": reuse,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    load0 = os.getloadavg()[0]
    with contextlib.nullcontext(None) if local else dask_cluster(workers, tmp) as address:
        t0 = time.perf_counter()
        summary = run_sweep(path, proj, address=address)
        total = time.perf_counter() - t0
    rows = json.loads((proj / "sweeps" / name / "summary.json").read_text())
    import csv

    table = list(csv.DictReader((proj / "sweeps" / name / "results.csv").open()))
    teacher_s = sum(t["seconds"] for t in rows.get("teachers", []))
    return {
        "config": name,
        "workers": workers,
        "cluster": "LocalCluster" if local else "external (dask scheduler + dask worker processes)",
        "threads_per_trial": threads,
        "reuse_teacher": reuse,
        "trials": summary["trials"],
        "done": summary["done"],
        "sweep_seconds": summary["seconds"],
        "total_seconds_with_startup": round(total, 2),
        "trials_per_minute": round(60 * summary["trials"] / summary["seconds"], 3),
        "teacher_task_seconds": round(teacher_s, 2),
        "trial_seconds": [float(r["seconds"]) for r in table],
        "trial_ran": [r["ran"] for r in table],
        "pids": sorted({int(r["pid"]) for r in table}),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4, help="Trials per sweep (prune.sparsity values).")
    ap.add_argument("--mnist", type=Path, default=None, help="MNIST folder (four IDX .gz files); default: digits.")
    ap.add_argument("--train-limit", type=int, default=10000, help="MNIST training images used (with --mnist).")
    ap.add_argument("--configs", nargs="+", default=["serial", "parallel", "parallel_no_reuse"])
    ap.add_argument("--local", action="store_true", help="A LocalCluster per configuration instead of external workers.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    overrides = ["train_teacher.epochs=30", "prune.finetune.epochs=3", "distill.epochs=3"]
    if args.mnist:
        overrides += ["data.source=mnist", f"data.path={json.dumps(str(args.mnist.resolve()))}",
                      f"data.train_limit={args.train_limit}", "train_teacher.epochs=5"]
    cpus = os.cpu_count() or 1
    plan = {
        "serial": (1, cpus, True),
        "parallel": (2, max(1, cpus // 2), True),
        "parallel_no_reuse": (2, max(1, cpus // 2), False),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp, contextlib.ExitStack() as stack:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        if not args.local:  # external workers report their task runs to a server they can reach
            from flows.ops import serve

            server = serve.start_server(Path(tmp) / "prefect", logs=Path(tmp) / "logs")
            stack.callback(server.close)
            os.environ["PREFECT_API_URL"] = server.api_url
        for name in args.configs:
            w, th, reuse = plan[name]
            print(f"running {name} ({w} worker(s), {th} thread(s) per trial, reuse_teacher={reuse}) ...", flush=True)
            results.append(run_config(name, w, th, reuse, args.trials, overrides, Path(tmp), args.local))
    by = {r["config"]: r for r in results}
    figures = {}
    if "serial" in by and "parallel" in by:
        figures["speedup_parallel_vs_serial"] = round(by["serial"]["sweep_seconds"] / by["parallel"]["sweep_seconds"], 3)
    if "parallel" in by and "parallel_no_reuse" in by:
        a, b = by["parallel"], by["parallel_no_reuse"]
        figures["teacher_reuse_saving_seconds"] = round(b["sweep_seconds"] - a["sweep_seconds"], 2)
        figures["teacher_reuse_saving_fraction"] = round(1 - a["sweep_seconds"] / b["sweep_seconds"], 3)
        figures["trial_cpu_seconds_reuse"] = round(sum(a["trial_seconds"]) + a["teacher_task_seconds"], 1)
        figures["trial_cpu_seconds_no_reuse"] = round(sum(b["trial_seconds"]), 1)
    import torch

    host = {
        "cpu": cpu_model(), "cpus": cpus, "torch": torch.__version__, "python": platform.python_version(),
        "data": "mnist" if args.mnist else "digits",
        "cluster": "LocalCluster" if args.local else "external",
        "overrides": overrides,  # write_results records the MNIST folder as MNIST_DIR
    }
    write_results(args.out, {"host": host, "results": results, "figures": figures})
    print(f"\nHost: {host['cpu']}, {cpus} CPUs, torch {host['torch']}; data {host['data']}; {args.trials} trials per sweep\n")
    print("| config | workers | threads/trial | reuse teacher | sweep s | with start-up s | trials/min | mean trial s | load before→after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mean = sum(r["trial_seconds"]) / max(len(r["trial_seconds"]), 1)
        print(f"| {r['config']} | {r['workers']} | {r['threads_per_trial']} | {r['reuse_teacher']} | {r['sweep_seconds']:.1f} | "
              f"{r['total_seconds_with_startup']:.1f} | {r['trials_per_minute']:.2f} | {mean:.1f} | {r['load_before']}→{r['load_after']} |")
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
