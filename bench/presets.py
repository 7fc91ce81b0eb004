"""The model-family presets on MNIST, each through ``dvc repro`` in a fresh project.

    .venv/bin/python bench/presets.py --mnist ../shared/data/mnist [--presets mnist-mobilenet mnist-lstm ...]
        [--set KEY=VALUE ...] [--out bench/results/presets.json]

For each preset (``examples/<name>/params.yaml``): copy this project's pipeline into a
new git + DVC repository (empty cache), write the preset as its params.yaml (plus
``--set`` overrides; the MNIST folder is copied in as ``data/mnist``), run ``dvc repro``
and time it, then read what the stages wrote: the teacher's test error, every
variant's whole-file size ratio and error difference against the teacher, and the
CPU latency of the teacher and each variant at batch 1 and 256, measured by the
evaluate stage in one runtime for all (``evaluate.runtime``; ``auto`` compiles when a
variant is a static int8 graph). Nothing here re-implements a stage.

Prints one markdown table per preset and writes the raw figures (with host, load
average before and after, and the overrides) to ``--out``. Latencies are only
trustworthy on an idle CPU: the load averages are recorded for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sweep_throughput import fresh_project  # noqa: E402

from schemas.metrics import Metrics  # noqa: E402
from shrinkflow.measure import cpu_model  # noqa: E402

PRESETS = ["mnist-mobilenet", "mnist-lstm", "mnist-gru", "mnist-transformer"]
VARIANTS = ["teacher", "pruned", "quantized", "student"]


def run_preset(name: str, mnist: Path, overrides: list[str], tmp: Path) -> dict:
    from shrinkflow.config import apply_to_params_file

    proj = fresh_project(tmp / name, [])
    shutil.copytree(mnist, proj / "data" / "mnist", ignore=shutil.ignore_patterns("*.md", "MD5SUMS"))
    apply_to_params_file(proj / "params.yaml", source=ROOT / "examples" / name / "params.yaml",
                         overrides=["data.path=data/mnist", *overrides])
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               DVC_NO_ANALYTICS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    subprocess.run(["git", "commit", "-qam", "preset"], cwd=proj, check=True, env={
        **env, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@invalid",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@invalid"})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = Metrics.read(proj)
    stages = {s: json.loads((proj / "reports" / f"{s}.json").read_text()) for s in ("train_teacher", "prune", "quantize", "distill")}
    teacher = metrics["teacher"]
    rows = {}
    for v in VARIANTS:
        m = metrics[v]
        rows[v] = {
            "format": m.format,
            "size_bytes": m.size_bytes,
            "compression_ratio": m.compression_ratio,
            "error_pct": 100 * (1 - m.accuracy),
            "error_delta_pp": 100 * (teacher.accuracy - m.accuracy),
            "params": m.params,
            "macs": m.macs,
            "latency_ms_b1": m.latency_ms(1),
            "latency_ms_b256": m.latency_ms(256),
            "speedup_b1": m.speedup(1),
            "speedup_b256": m.speedup(256),
            "runtime": m.runtime,
        }
    return {
        "preset": name,
        "overrides": overrides,
        "wall_seconds": round(wall, 1),
        "teacher_seconds": stages["train_teacher"].get("seconds"),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "variants": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override KEY=VALUE (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "presets.json")
    args = ap.parse_args()
    import torch

    host = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__}
    results = []
    with tempfile.TemporaryDirectory(prefix="presets-") as tmp:
        for name in args.presets:
            print(f"running {name} ...", flush=True)
            r = run_preset(name, args.mnist.resolve(), args.overrides, Path(tmp))
            results.append(r)
            runtime = r["variants"]["teacher"]["runtime"]
            print(f"\n## {name}: dvc repro {r['wall_seconds']:.0f} s (teacher {r['teacher_seconds']:.0f} s), load "
                  f"{r['load_before']}→{r['load_after']}; latency: {runtime}, 1 thread\n")
            print("| variant | format | file bytes | ratio | error % | Δ pp | b1 ms | b256 ms | speedup b1 | speedup b256 |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for v, m in r["variants"].items():
                print(f"| {v} | {m['format']} | {m['size_bytes']:,} | {m['compression_ratio']:.2f}× | {m['error_pct']:.2f} | "
                      f"{m['error_delta_pp']:+.2f} | {m['latency_ms_b1']:.3f} | {m['latency_ms_b256']:.2f} | "
                      f"{m['speedup_b1']:.2f}× | {m['speedup_b256']:.2f}× |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"host": host, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
