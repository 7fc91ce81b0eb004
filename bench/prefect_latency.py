"""Prefect overheads on the production path: server start → ready, and deployment run
request → Completed for an all-cached pipeline (process worker, 1 s poll).

Builds a throwaway project from this working tree (digits, small budgets), runs the
pipeline once with `dvc repro` (not timed), then starts a real local stack with
flows.ops.serve (own PREFECT_HOME, 127.0.0.1, free port) and times:

- server start → /api/health answers: first start on a fresh PREFECT_HOME (database
  migrations) and restarts on the same home;
- `compress/local` run request → Completed, every stage cached by DVC: wall time seen by
  a client polling every 0.1 s, and the server's own timestamps (created → Completed).

Prints a table and writes bench/results/prefect_latency.json.

    .venv/bin/python bench/prefect_latency.py [--runs 5] [--restarts 2] [--poll 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["train_teacher.epochs=5", "prune.finetune.epochs=1", "distill.epochs=1", "evaluate.min_run_time=0.05"]




def make_project(dest: Path, env: dict[str, str]) -> Path:
    """A clone of this repository's HEAD with a small training budget, reproduced once."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    from shrinkflow.config import apply_to_params_file

    apply_to_params_file(dest / "params.yaml", overrides=SMALL)
    for cmd in (["git", "commit", "-qam", "bench budget"], [str(BIN / "dvc"), "repro", "-q"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def run_once(deployment_id) -> tuple[float, float, str]:
    """Request a run and poll until it is final; (client wall s, server created→end s, state)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        t0 = time.perf_counter()
        run = client.create_flow_run_from_deployment(deployment_id)
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                wall = time.perf_counter() - t0
                break
            time.sleep(0.1)
        server = (run.state.timestamp - run.created).total_seconds()
        return wall, server, run.state.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="Deployment runs to time.")
    ap.add_argument("--restarts", type=int, default=2, help="Server restarts on a warm PREFECT_HOME to time.")
    ap.add_argument("--poll", type=float, default=1.0, help="Worker poll interval (PREFECT_WORKER_QUERY_SECONDS).")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from flows.ops import serve

    env = serve.prefect_env(None, extra={
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"})
    env.pop("PREFECT_API_URL", None)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("GIT_", "DVC_", "PREFECT_SERVER_A"))})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("building the project and running the pipeline once (not timed) ...", flush=True)
        root = make_project(tmp / "proj", env)
        home = tmp / "prefect-home"
        starts: list[float] = []
        stack = serve.start_server(home, logs=tmp / "logs")
        first_start = stack.ready_s
        for _ in range(args.restarts):
            port = int(stack.api_url.rsplit(":", 1)[1].split("/")[0])
            stack.close()
            stack = serve.start_server(home, port=port, logs=tmp / "logs")
            starts.append(stack.ready_s)
        walls, servers, states = [], [], []
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

            serve.create_pool(stack.env)
            serve.deploy(root, stack.env, names=["local"])
            stack.start_worker(poll_seconds=args.poll, cwd=root)
            with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_HOME: home}):
                from prefect.client.orchestration import get_client

                with get_client(sync_client=True) as client:
                    dep = client.read_deployment_by_name("compress/local")
                run_once(dep.id)  # warm-up: the worker's first run imports everything cold
                for i in range(args.runs):
                    w, s, st = run_once(dep.id)
                    walls.append(w)
                    servers.append(s)
                    states.append(st)
                    print(f"  run {i + 1}: {w:.2f} s wall, {s:.2f} s server-side, {st}", flush=True)
        finally:
            stack.close()

    import torch

    from shrinkflow.measure import cpu_model

    host = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1m_at_end": os.getloadavg()[0]}
    result = {
        "host": host,
        "worker_poll_s": args.poll,
        "server_first_start_s": first_start,
        "server_restart_s": starts,
        "run_to_completed_wall_s": walls,
        "run_to_completed_server_s": servers,
        "states": states,
        "median_wall_s": statistics.median(walls) if walls else None,
        "median_server_s": statistics.median(servers) if servers else None,
    }
    print()
    print(f"host: {host['cpu']}, {host['cpus']} CPUs, torch {host['torch']}, load avg {host['load_avg_1m_at_end']:.1f}")
    print("| measure | median s | all runs (s) |")
    print("|---|---|---|")
    print(f"| server start → ready, fresh PREFECT_HOME | {first_start:.1f} | {first_start:.1f} |")
    if starts:
        print(f"| server start → ready, restart | {statistics.median(starts):.1f} | {', '.join(f'{s:.1f}' for s in starts)} |")
    if walls:
        print(f"| run request → Completed, all cached (client wall, poll {args.poll:g} s) | {result['median_wall_s']:.1f} | "
              f"{', '.join(f'{w:.1f}' for w in walls)} |")
        print(f"| run request → Completed, all cached (server timestamps) | {result['median_server_s']:.1f} | "
              f"{', '.join(f'{s:.1f}' for s in servers)} |")
    out = REPO / "bench" / "results" / "prefect_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
