"""Fast checks of the production helpers: the GTO registry on a tiny git repo, process
stopping by PID, and retrain parameter checks that need no server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import project_env, sh

from flows.ops import registry, serve
from shrinkflow.errors import ParamsError


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    for k, v in project_env().items():
        if k.startswith("GIT_"):
            monkeypatch.setenv(k, v)
    root = tmp_path / "repo"
    root.mkdir()
    (root / ".gitignore").write_text("/reports/\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    sh(["git", "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "init"], root)
    return root


def test_register_assign_and_read_back_the_record(repo):
    assert registry.in_stage(repo) is None  # nothing registered yet
    v1 = registry.register_and_assign(repo, {"final_variant": "student", "metrics": {"accuracy": 0.93}})
    assert v1.version == "v0.0.1" and v1.commit == registry.head(repo)
    prod = registry.in_stage(repo)
    assert (prod.version, prod.commit) == (v1.version, v1.commit)
    assert prod.record["metrics"]["accuracy"] == 0.93
    assert registry.same_model(repo, prod.commit)

    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "reports").mkdir()
    (repo / "reports" / "metrics.json").write_text("{}")
    assert registry.commit_paths(repo, ["dvc.lock", "missing.yaml"], "candidate", force=["reports/metrics.json"])
    tracked = registry.git(repo, "ls-files").stdout.split()
    assert "reports/metrics.json" in tracked  # ignored by .gitignore, committed on purpose
    assert not registry.same_model(repo, prod.commit)
    assert not registry.commit_paths(repo, ["dvc.lock"], "nothing new")

    v2 = registry.register_and_assign(repo, {"metrics": {"accuracy": 0.95}})
    assert v2.version == "v0.0.2"
    assert registry.in_stage(repo).version == "v0.0.2"
    assert {"shrinkflow@v0.0.1", "shrinkflow@v0.0.2"} <= set(registry.git(repo, "tag").stdout.split())


def test_stop_ends_a_process_group_by_pid(tmp_path):
    # a parent that starts a child in its group and ignores nothing: both must go
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = serve._spawn([sys.executable, "-c", code], dict(project_env()), tmp_path / "p.log")
    time.sleep(0.5)
    children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2
    serve.stop(proc, grace=5)
    assert proc.returncode is not None
    deadline = time.monotonic() + 10  # the orphaned child is reaped by init a moment later
    while (left := subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()):
        assert time.monotonic() < deadline, f"still running in the group: {left}"
        time.sleep(0.1)


def test_retrain_queue_refuses_bad_parameters_before_contacting_a_server(tmp_path):
    from flows.retrain import queue

    with pytest.raises(ParamsError, match="unknown retrain parameter"):
        queue(root=str(tmp_path), max_regresion=0.1)
    with pytest.raises(ParamsError, match="model_name"):
        queue(root=str(tmp_path), model_name="Not A Name")
    with pytest.raises(ParamsError, match="max_regression"):
        queue(root=str(tmp_path), max_regression=-1)


def test_serve_refuses_a_folder_without_prefect_yaml(tmp_path):
    from shrinkflow.errors import ShrinkflowError

    with pytest.raises(ShrinkflowError, match="prefect.yaml not found"):
        serve.deploy(tmp_path, {})


def test_latency_gate_checks_the_final_model_at_the_smallest_batch():
    from schemas.evaluate import EvaluateParams
    from tasks.evaluate import _gates

    from schemas.metrics import Metrics

    common = dict(agreement=1.0, size_bytes=1, params=1, nonzero_params=1, sparsity=0.0, layer_sparsity={}, macs=None,
                  format="fp32", path="m.pt")
    metrics = Metrics.model_validate({
        "teacher": {"accuracy": 0.95, "compression_ratio": 1.0, "latency_ms_b1": 0.2, "latency_ms_b256": 3.0, **common},
        "student": {"accuracy": 0.94, "compression_ratio": 4.0, "latency_ms_b1": 0.8, "latency_ms_b256": 2.0, **common},
    })
    gates = {g.name: g for g in _gates(EvaluateParams(batch_sizes=[256, 1], gates={"max_latency_ms": 0.5}), metrics, "classification")}
    assert gates["max_latency_ms_b1"].value == 0.8 and not gates["max_latency_ms_b1"].passed
    gates = {g.name: g for g in _gates(EvaluateParams(gates={"max_latency_ms": 1.0}), metrics, "classification")}
    assert gates["max_latency_ms_b1"].passed
