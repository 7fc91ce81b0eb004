"""How long the spine takes on digits: a full `dvc repro`, a no-op `dvc repro`, and
`shrinkflow run` with everything cached (ephemeral Prefect).

Runs in a fresh clone of this repository's HEAD (as a new user would), with the venv
of the interpreter running this script. Prints a table and writes
bench/results/spine_speed.json.

    .venv/bin/python bench/spine_speed.py [--repeats 3]
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

import torch

from shrinkflow.measure import cpu_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    rows: dict[str, list[float]] = {"dvc repro (from scratch)": [], "dvc repro (no-op)": [], "shrinkflow run (all cached)": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            proj = Path(tmp) / "proj"
            subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
            rows["dvc repro (from scratch)"].append(timed([str(BIN / "dvc"), "repro"], proj, env))
            rows["dvc repro (no-op)"].append(timed([str(BIN / "dvc"), "repro"], proj, env))
            rows["shrinkflow run (all cached)"].append(timed([str(BIN / "shrinkflow"), "run"], proj, env))
    host = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    result = {"host": host, "repeats": args.repeats, "seconds": rows}
    print(f"host: {host}")
    print(f"| what | median s | min s | max s | (n={args.repeats}) |\n|---|---|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | |")
    out = REPO / "bench/results/spine_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
