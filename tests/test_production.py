"""Production end to end: real Prefect server + process worker, GTO promotion, DVC publishing.

One server, one worker and one project per module (see tests/servers.py); the tests run
in file order on that project, each setting up what it checks. The project reads a
watched data folder (data.source npz, data.path data/raw): dropping a new .npz there is
"new data".
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, FAST, REPO, dvc, make_project, project_env, ran_stages, set_params, sh
from servers import prefect, prefect_stack, s3_endpoint  # noqa: F401 - fixtures

from flows.ops import registry, serve
from schemas.paths import STAGES

pytestmark = pytest.mark.slow

#: The watched folder holds digits in two batches: the second arrives later as "new data".
FIRST_BATCH = 1000


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def _write_batch(root: Path, name: str, sl: slice) -> None:
    X, y = _digits()
    np.savez(root / "data" / "raw" / name, X=X[sl], y=y[sl])


def _tags(root: Path) -> set[str]:
    return set(registry.git(root, "tag").stdout.split())


def _commit_all(root: Path, message: str) -> None:
    registry.git(root, "add", "-A")
    registry.git(root, "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def deployed(prefect_stack, tmp_path_factory) -> Path:  # noqa: F811 - fixture
    """A project on the watched-folder data source, deployed with the repository's prefect.yaml."""
    root = make_project(tmp_path_factory.mktemp("prod") / "proj")
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    _write_batch(root, "batch-1.npz", slice(0, FIRST_BATCH))
    set_params(root, [*FAST, "data.source=npz", "data.path=data/raw"])
    _commit_all(root, "watched data folder")
    serve.deploy(root, prefect_stack.env)
    yield root
    _pause_schedules(prefect_stack)  # no nightly run may start after the tests


def _scheduled_runs(deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
        )
        return dep, runs


def _pause_schedules(stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    dep, runs = _scheduled_runs("retrain/nightly")
    with get_client(sync_client=True) as client:
        for s in client.read_deployment_schedules(dep.id):
            client.update_deployment_schedule(dep.id, s.id, active=False)
        for r in runs:  # pausing usually deletes them already
            with contextlib.suppress(ObjectNotFound):
                client.delete_flow_run(r.id)


def _logs_of_last_run(deployment: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        run = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                                    sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        return "\n".join(entry.message for entry in logs)


# ------------------------------------------------------------------------- deployments


def test_cron_schedule_yields_scheduled_runs(deployed):
    deadline = time.monotonic() + 90
    while True:
        dep, runs = _scheduled_runs("retrain/nightly")
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert runs, "the cron schedule produced no scheduled run"
    assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in runs} == {(2, 0)}  # "0 2 * * *" UTC
    limit = getattr(dep, "global_concurrency_limit", None)
    assert (limit.limit if limit is not None else dep.concurrency_limit) == 1
    _pause_schedules(None)  # keep the 02:00 runs from firing into the tests


def test_compress_deployment_run_completes(deployed, prefect_stack):  # noqa: F811
    proc = prefect(prefect_stack, "deployment", "run", "compress/local", "--watch", "--watch-timeout", "300", cwd=deployed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Completed" in proc.stdout
    metrics = json.loads((deployed / "reports" / "metrics.json").read_text())
    assert {"teacher", "student"} <= set(metrics)
    lock = (deployed / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in STAGES)
    # DVC's log lines and the stage commands' own output reach the run's logs (the UI)
    deadline = time.monotonic() + 30  # logs are shipped in batches
    while not ("Running stage 'data'" in (logs := _logs_of_last_run("compress/local")) and "evaluate: done" in logs):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)


def test_bad_parameters_are_refused_before_queueing(deployed, prefect_stack):  # noqa: F811
    from flows.retrain import queue
    from shrinkflow.errors import ParamsError

    _, before = _scheduled_runs("retrain/nightly")
    with pytest.raises(ParamsError, match="unknown retrain parameter"):
        queue(root=str(deployed), max_regresion=0.1)
    with pytest.raises(ParamsError, match="model_name"):
        queue(root=str(deployed), model_name="Not A Name")
    with pytest.raises(ParamsError, match="prune.sparsity"):
        queue(root=str(deployed), overrides=["prune.sparsity=2"])
    # The server refuses a value outside the deployment's parameter schema as well.
    proc = prefect(prefect_stack, "deployment", "run", "retrain/nightly", "--param", "max_regression=-1", cwd=deployed)
    assert proc.returncode != 0
    _, after = _scheduled_runs("retrain/nightly")
    assert len(after) == len(before)


# ------------------------------------------------------------------------------ retrain


def test_retrain_twice_on_unchanged_data_recomputes_nothing_the_second_time(deployed):
    from prefect.deployments import run_deployment

    from flows.retrain import retrain

    run = run_deployment("retrain/nightly", parameters={"max_regression": 0.05}, timeout=300)
    assert run.state.is_completed(), run.state
    first = registry.in_stage(deployed)
    assert first is not None and first.tag in _tags(deployed)
    assert first.commit == registry.head(deployed)
    assert "accuracy" in first.record["metrics"]
    tags = _tags(deployed)

    second = retrain(root=str(deployed), max_regression=0.05)
    assert second.ran == []
    assert not second.promoted and second.version == first.version
    assert _tags(deployed) == tags


def test_new_data_retrains_passes_gates_promotes_and_publishes(deployed, tmp_path):
    from flows.retrain import retrain

    store = tmp_path / "store"
    dvc(deployed, "remote", "add", "-d", "store", str(store))
    _commit_all(deployed, "local DVC remote")
    before = registry.in_stage(deployed)
    _write_batch(deployed, "batch-2.npz", slice(FIRST_BATCH, None))

    result = retrain(root=str(deployed), max_regression=0.05)
    assert result.ran == list(STAGES)
    assert all(g.passed for g in result.gates)
    assert any(g.name == "no_regression_vs_prod" for g in result.gates)
    assert result.promoted
    prod = registry.in_stage(deployed)
    assert prod.version != (before.version if before else None)
    assert f"shrinkflow@{prod.version}" in _tags(deployed)
    assert prod.commit == registry.head(deployed)
    assert "batch-2.npz" in registry.git(deployed, "ls-tree", "-r", "--name-only", prod.commit).stdout
    assert "store" in result.published and store.is_dir()

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(deployed), str(clone)], tmp_path)
    dvc(clone, "pull", "--run-cache")
    assert ran_stages(dvc(clone, "repro").stdout) == []
    assert json.loads((clone / "reports/metrics.json").read_text()) == json.loads((deployed / "reports/metrics.json").read_text())


def test_publish_to_s3_then_fresh_clone_recomputes_nothing(deployed, s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    from flows.retrain import retrain

    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    dvc(deployed, "remote", "add", "s3store", f"s3://{s3_endpoint.bucket}/store")
    dvc(deployed, "remote", "modify", "s3store", "endpointurl", s3_endpoint.url)
    _commit_all(deployed, "S3 remote")

    result = retrain(root=str(deployed), max_regression=0.05, remote="s3store")
    assert "s3store" in result.published

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint.url, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_endpoint.bucket).get("Contents", [])]
    assert any("/runs/" in k for k in keys), "the run-cache was not pushed"

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(deployed), str(clone)], tmp_path)
    env = {**project_env(), **s3_endpoint.env}
    sh([str(BIN / "dvc"), "pull", "--run-cache", "-r", "s3store"], clone, env=env)
    assert ran_stages(sh([str(BIN / "dvc"), "repro"], clone, env=env).stdout) == []


def test_impossible_gate_fails_the_run_and_leaves_production_unchanged(deployed):
    from flows.retrain import retrain

    before, tags, head = registry.in_stage(deployed), _tags(deployed), registry.head(deployed)
    params = (deployed / "params.yaml").read_text()
    state = retrain(root=str(deployed), overrides=["evaluate.gates.min_compression_ratio=1000"], return_state=True)
    assert state.is_failed()
    assert "min_compression_ratio" in state.message and "production unchanged" in state.message
    after = registry.in_stage(deployed)
    assert (after.version, after.commit) == (before.version, before.commit)
    assert _tags(deployed) == tags and registry.head(deployed) == head
    assert (deployed / "params.yaml").read_text() == params  # the rejected edit is undone
    from prefect.artifacts import Artifact

    artifact = Artifact.get("retrain-decision")
    assert artifact.flow_run_id == state.state_details.flow_run_id
    assert "| teacher |" in artifact.data and "not promoted: min_compression_ratio" in artifact.data


def test_a_failed_class_gate_blocks_promotion_and_the_run_shows_what_changed(deployed):
    from prefect.artifacts import Artifact

    from flows.retrain import retrain

    before, tags = registry.in_stage(deployed), _tags(deployed)
    # No class may lose anything: only evaluate reruns, and the seeded student loses at least one input of some class.
    state = retrain(root=str(deployed), overrides=["evaluate.gates.max_class_drop=0"], return_state=True)
    drop = json.loads((deployed / "reports/metrics.json").read_text())["student"]["worst_class_drop"]
    assert drop > 0
    assert state.is_failed() and f"max_class_drop = {drop:.4g} (limit 0)" in state.message
    assert registry.in_stage(deployed) == before and _tags(deployed) == tags  # production unchanged
    changes = Artifact.get("retrain-changes")
    assert changes.flow_run_id == state.state_details.flow_run_id
    assert "| student |" in changes.data and "newly wrong" in changes.data
    assert "| max_class_drop |" in changes.data and "**FAIL** | class " in changes.data
