"""Sweeps end to end: `shrinkflow sweep` on a 2-worker Dask LocalCluster, digits, tiny trials."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import BIN, FAST, make_project, project_env, set_params, sh

from shrinkflow.config import load_params

pytestmark = pytest.mark.slow

#: metrics.json keys of the final model every done trial's row carries.
METRIC_KEYS = {"accuracy", "agreement", "size_bytes", "params", "nonzero_params", "latency_ms_b1", "compression_ratio", "speedup_b1"}
TINY = {"evaluate.batch_sizes": [1], "evaluate.min_run_time": 0.01}
# Valid params (the class imports, so `validate` passes) that fail when distill builds the student:
# nn.Linear needs in_features and out_features.
BROKEN_STUDENT = {"arch": "module", "import": "torch.nn:Linear"}


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    """One project for both sweeps: the second restores the first one's teacher from the shared cache."""
    root = make_project(tmp_path_factory.mktemp("sweepdask") / "proj")
    set_params(root, FAST)
    return root


def run_sweep(proj: Path, tmp_path: Path, sweep: dict):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    env = project_env({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"})
    proc = sh([str(BIN / "shrinkflow"), "sweep", str(path), "--root", str(proj), "--workers", "2"], proj, env=env, check=False)
    out = proj / "sweeps" / sweep["name"]
    assert (out / "summary.json").is_file(), proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "results.csv").open()))
    return proc, out, summary, rows


def test_grid_sweep_on_two_dask_workers(proj, tmp_path):
    proc, out, summary, rows = run_sweep(proj, tmp_path, {
        "name": "grid",
        "set": TINY,
        "space": {"prune.sparsity": [0.5, 0.9], "distill.temperature": [2.0, 4.0]},
        "criterion": {"max_drop": 0.05},
    })
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["trials"] == 4 and summary["done"] == 4, summary
    assert len(rows) == 4
    for r in rows:
        assert METRIC_KEYS <= {k for k, v in r.items() if v != ""}, r
    # Each trial ran in a Dask worker process, never in the CLI's own, and both workers took trials.
    pids = {int(r["pid"]) for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids
    # The teacher was trained once (the teacher task) and restored from the run-cache in every trial.
    assert len(summary["teachers"]) == 1 and "train_teacher" in summary["teachers"][0]["ran"]
    for r in rows:
        assert "train_teacher" not in r["ran"].split() and "train_teacher" in r["reused"].split(), r
        assert {"prune", "quantize", "distill", "evaluate"} <= set(r["ran"].split())
    # Sparsity reaches the files: the 0.9 trials are smaller.
    size = {(float(r["prune.sparsity"]), float(r["distill.temperature"])): int(r["size_bytes"]) for r in rows}
    assert size[0.9, 2.0] < size[0.5, 2.0] and size[0.9, 4.0] < size[0.5, 4.0]
    # Frontier, plots data, PNG and the chosen params file.
    assert summary["pareto"] and set(summary["pareto"]) <= {int(r["trial"]) for r in rows}
    assert (out / "pareto.png").stat().st_size > 1000
    assert len(json.loads((out / "pareto.json").read_text())) == 4
    chosen = summary["chosen"]
    best = load_params(out / "best-params.yaml", root=proj)
    assert best.prune.sparsity == chosen["point"]["prune.sparsity"]
    assert best.distill.temperature == chosen["point"]["distill.temperature"]
    assert chosen["drop"] <= 0.05
    assert (out / "trials" / f"{chosen['trial']:03d}" / "report.md").is_file()


def test_auto_sweep_meets_the_criterion_and_survives_a_crashing_trial(proj, tmp_path):
    max_drop = 0.03
    proc, out, summary, rows = run_sweep(proj, tmp_path, {
        "name": "auto",
        "set": TINY,
        "space": {"prune.sparsity": [0.5, 0.9, 0.99], "distill.student": ["compressed", BROKEN_STUDENT]},
        # seed 4 starts with one broken and one sound trial side by side on the two workers
        "search": {"mode": "auto", "seed": 4},
        "criterion": {"max_drop": max_drop},
        "objective": "size",
        "budget": {"trials": 4, "seconds": 900},
    })
    assert summary["trials"] == 4, summary
    broken = [r for r in rows if "no_such_module" in r["distill.student"]]
    sound = [r for r in rows if r not in broken]
    assert broken and sound
    for r in broken:  # recorded as failed, with the stage and the reason
        assert r["status"] == "failed" and r["reason"].startswith("distill:") and "no_such_module" in r["reason"], r
    assert all(r["status"] == "done" for r in sound), sound
    # The second sweep reused the first one's teacher from the shared DVC cache.
    assert summary["teachers"][0]["ran"] == []
    # The chosen config meets the criterion, and it is the smallest sound trial that does.
    assert proc.returncode == 0 and summary["chosen"] is not None, proc.stdout + proc.stderr
    passing = [r for r in sound if float(r["teacher_accuracy"]) - float(r["accuracy"]) <= max_drop + 1e-12]
    chosen = next(r for r in rows if int(r["trial"]) == summary["chosen"]["trial"])
    assert chosen in passing
    assert int(chosen["size_bytes"]) == min(int(r["size_bytes"]) for r in passing)
    best = load_params(out / "best-params.yaml", root=proj)
    assert best.prune.sparsity == float(chosen["prune.sparsity"]) and best.distill.student == "compressed"
