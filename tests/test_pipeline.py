"""End to end through both front doors, in a real git + DVC repo on digits."""

from __future__ import annotations

import json

import pytest
from conftest import BIN, dvc, project_env, ran_stages, set_params, sh

from schemas.paths import STAGES, VARIANTS

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "accuracy", "agreement", "size_bytes", "params", "nonzero_params", "latency_ms_b1", "latency_ms_b256",
    "compression_ratio", "speedup_b1", "speedup_b256",
}


def test_dvc_repro_then_flow_share_one_cache(project):
    first = dvc(project, "repro")
    assert ran_stages(first.stdout) == list(STAGES)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == set(VARIANTS.values())
    for variant, m in metrics.items():
        assert METRIC_KEYS <= set(m), variant
        assert m["size_bytes"] == (project / m["path"]).stat().st_size
    assert metrics["teacher"]["accuracy"] >= 0.9
    assert metrics["teacher"]["agreement"] == 1.0
    assert metrics["quantized"]["size_bytes"] < metrics["teacher"]["size_bytes"]
    assert metrics["student"]["nonzero_params"] < metrics["teacher"]["nonzero_params"]

    # Nothing changed: nothing reruns.
    assert ran_stages(dvc(project, "repro").stdout) == []

    # A prune param: prune and what follows rerun, never data or train_teacher.
    set_params(project, ["prune.sparsity=0.6"])
    assert ran_stages(dvc(project, "repro").stdout) == ["prune", "quantize", "distill", "evaluate"]

    # The Prefect flow (ephemeral server) over the same repo reruns nothing ...
    flow = sh([str(BIN / "shrinkflow"), "run", "--root", str(project)], project)
    assert flow.stdout.count("cached") == len(STAGES), flow.stdout
    assert "ran" not in flow.stdout.split("| variant")[0]
    status = dvc(project, "status", "--json")
    assert json.loads(status.stdout) == {}

    # ... and a change made through the flow is recorded where `dvc repro` sees it.
    flow = sh(
        [str(BIN / "shrinkflow"), "run", "--root", str(project),
         "--set", "quantize.enabled=false", "--set", "evaluate.gates.min_compression_ratio=1000"],
        project, check=False,
    )
    assert "quantize       ran" in flow.stdout and "prune          cached" in flow.stdout
    # An unreachable gate fails the run, and the run says which gate.
    assert flow.returncode == 1 and "gate min_compression_ratio" in flow.stdout and "FAIL" in flow.stdout
    assert ran_stages(dvc(project, "repro").stdout) == []
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["quantized"]["size_bytes"] == metrics["pruned"]["size_bytes"]


def test_bad_params_through_run_touch_nothing(project):
    dvc(project, "repro", "data")
    before = (project / "params.yaml").read_text()
    splits = (project / "data/prepared/splits.npz").stat().st_mtime_ns
    proc = sh([str(BIN / "shrinkflow"), "run", "--root", str(project), "--set", "prune.sparsity=1.5"], project, check=False)
    assert proc.returncode == 2
    assert "prune.sparsity" in proc.stderr
    assert (project / "params.yaml").read_text() == before
    assert (project / "data/prepared/splits.npz").stat().st_mtime_ns == splits
    assert not (project / "models").exists()


def test_flow_rejects_bad_parameters_before_any_stage(project, tmp_path):
    code = (
        "import sys\n"
        "from flows.compress import compress\n"
        "from shrinkflow.errors import ParamsError\n"
        "try:\n"
        f"    compress(root={str(project)!r}, overrides=['quantize.method=int3'])\n"
        "except ParamsError as exc:\n"
        "    print('REJECTED', exc)\n"
        "    sys.exit(2)\n"
    )
    env_home = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = sh([str(BIN / "python"), "-c", code], project, env=project_env(env_home), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "REJECTED" in proc.stdout and "quantize.method" in proc.stdout
    assert not (project / "data/prepared").exists()
