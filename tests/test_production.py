"""Production end to end: real Prefect server + process worker, GTO promotion, DVC publishing,
git remotes that accept or refuse, and the paired regression gate.

One server, one worker and one project per module (see tests/servers.py); the tests run
in file order on that project, each setting up what it checks. The project reads a
watched data folder (data.source npz, data.path data/raw) with a fixed test set
(``X_test``/``y_test`` in the first batch): dropping a new .npz there is "new data", and
every candidate is compared with production on the same 360 test digits.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, FAST, REPO, dvc, make_project, project_env, ran_stages, set_params, sh
from servers import prefect, prefect_stack, s3_endpoint  # noqa: F401 - fixtures

from flows.ops import registry, serve
from schemas.paths import STAGES

pytestmark = pytest.mark.slow

TEST_SIZE = 360  # fixed test digits, in batch-1.npz as X_test / y_test
FIRST_BATCH = 800  # training digits in batch-1.npz; batch-2.npz brings the rest
#: Trained long enough that two seeds differ by noise only (FAST's 8 epochs leave digits at ~86 %).
PROD_PARAMS = [*FAST, "train_teacher.epochs=30", "data.source=npz", "data.path=data/raw"]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    return (d.data.astype(np.float32)[order] / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64)[order]


def _write_batch(root: Path, name: str, sl: slice, with_test: bool = False, relabel: tuple[int, int, int] | None = None) -> None:
    """Training digits ``sl`` (after the test digits); ``relabel=(a, b, k)`` labels every a but the first k as b."""
    X, y = _digits()
    Xtr, ytr = X[TEST_SIZE:][sl], y[TEST_SIZE:][sl].copy()
    if relabel is not None:
        a, b, keep = relabel
        ytr[np.flatnonzero(ytr == a)[keep:]] = b
    t = slice(0, TEST_SIZE if with_test else 0)
    np.savez(root / "data" / "raw" / name, X=Xtr, y=ytr, X_test=X[t], y_test=y[t])


def _tags(root: Path) -> set[str]:
    return set(registry.git(root, "tag").stdout.split())


def _commit_all(root: Path, message: str) -> None:
    registry.git(root, "add", "-A")
    registry.git(root, "commit", "-q", "-m", message)


def _status(root: Path) -> str:
    return registry.git(root, "status", "--porcelain").stdout


def _remote_refs(root: Path, remote: str = "origin") -> dict[str, str]:
    out = registry.git(root, "ls-remote", remote).stdout
    return {ref: oid for oid, ref in (line.split("\t") for line in out.splitlines())}


def _prod(root: Path) -> tuple[str, str] | None:
    v = registry.in_stage(root)
    return (v.version, v.commit) if v else None


def _scenario(name: str, state: str, before: tuple[str, str] | None, root: Path, status_before: str = "") -> None:
    """One row of the closing note's table (printed with -s): scenario, final state, prod before → after, workspace."""
    after, status = _prod(root), _status(root)
    workspace = "clean" if status == "" else f"as before the run ({status.strip()})" if status == status_before else f"CHANGED: {status.strip()}"
    print(f"\nSCENARIO | {name} | {state} | {before[0] if before else '-'} → {after[0] if after else '-'} | {workspace} |")


@pytest.fixture(scope="module")
def deployed(prefect_stack, tmp_path_factory) -> Path:  # noqa: F811 - fixture
    """A project on the watched-folder data source, deployed with the repository's prefect.yaml."""
    root = make_project(tmp_path_factory.mktemp("prod") / "proj")
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    _write_batch(root, "batch-1.npz", slice(0, FIRST_BATCH), with_test=True)
    set_params(root, PROD_PARAMS)
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


def _logs_of_last_run(deployment: str, wait_for: tuple[str, ...] = (), timeout: float = 30) -> str:
    """The last run's log messages, once every string of ``wait_for`` is in them (logs ship in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(deployment)
            run = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                                        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        text = "\n".join(entry.message for entry in logs)
        if all(w in text for w in wait_for) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def _artifact(state) -> str:
    from prefect.artifacts import Artifact

    artifact = Artifact.get("retrain-decision")
    assert artifact.flow_run_id == state.state_details.flow_run_id
    return artifact.data


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


def test_bad_parameters_are_refused_before_queueing(deployed, prefect_stack):  # noqa: F811
    from flows.retrain import queue
    from shrinkflow.errors import ParamsError

    _, before = _scheduled_runs("retrain/nightly")
    with pytest.raises(ParamsError, match="unknown retrain parameter"):
        queue(root=str(deployed), max_regresion=0.1)
    with pytest.raises(ParamsError, match="model_name"):
        queue(root=str(deployed), model_name="Not A Name")
    with pytest.raises(ParamsError, match="significance"):
        queue(root=str(deployed), significance=0.7)
    with pytest.raises(ParamsError, match="prune.sparsity"):
        queue(root=str(deployed), overrides=["prune.sparsity=2"])
    # The server refuses a value outside the deployment's parameter schema as well.
    proc = prefect(prefect_stack, "deployment", "run", "retrain/nightly", "--param", "max_regression=-1", cwd=deployed)
    assert proc.returncode != 0
    _, after = _scheduled_runs("retrain/nightly")
    assert len(after) == len(before)


# ------------------------------------------------------------------------------ retrain


def test_first_retrain_through_the_deployment_promotes_with_every_line_in_its_own_logs(deployed, prefect_stack):  # noqa: F811
    proc = prefect(prefect_stack, "deployment", "run", "retrain/nightly", "--watch", "--watch-timeout", "600", cwd=deployed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished successfully in 'Promoted'" in proc.stdout
    _scenario("first run, no production yet (deployment, --watch)", "Promoted", None, deployed)
    first = registry.in_stage(deployed)
    assert first is not None and first.tag in _tags(deployed) and first.commit == registry.head(deployed)
    assert "accuracy" in first.record["metrics"]
    assert _status(deployed) == ""  # the candidate is committed, reports included
    # the stages ran as tasks of this run: their DVC lines and output are in its own logs, once each
    logs = _logs_of_last_run("retrain/nightly", wait_for=("Running stage 'data'", "evaluate: done", "promoted"))
    assert "Running stage 'data'" in logs and "evaluate: done" in logs and "train_teacher epoch 30/30" in logs
    assert "To track the changes with git" not in logs and "core.autostage" not in logs
    assert logs.count("Running stage 'prune'") == 1
    assert "Traceback" not in logs


def test_compress_deployment_after_retrain_recomputes_nothing(deployed, prefect_stack):  # noqa: F811
    proc = prefect(prefect_stack, "deployment", "run", "compress/local", "--watch", "--watch-timeout", "300", cwd=deployed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Completed" in proc.stdout
    logs = _logs_of_last_run("compress/local", wait_for=("evaluate: cached",))
    assert all(f"{s}: cached" in logs for s in STAGES), logs[-3000:]
    assert _status(deployed) == ""


def test_retrain_on_unchanged_data_recomputes_nothing_and_says_unchanged(deployed):
    from flows.retrain import retrain

    before, tags = _prod(deployed), _tags(deployed)
    state = retrain(root=str(deployed), return_state=True)
    result = state.result()
    assert state.is_completed() and state.name == "Unchanged", state.message
    assert result.ran == [] and not result.promoted and _prod(deployed) == before and _tags(deployed) == tags
    _scenario("unchanged data", state.name, before, deployed)
    logs = _run_logs(state)
    assert "data data/raw: unchanged since dvc.lock" in logs and "data stage out of date" not in logs


def _run_logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        text = "\n".join(e.message for e in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_new_data_retrains_passes_gates_promotes_and_publishes(deployed, tmp_path):
    from flows.retrain import retrain

    store = tmp_path / "store"
    dvc(deployed, "remote", "add", "-d", "store", str(store))
    _commit_all(deployed, "local DVC remote")
    before = registry.in_stage(deployed)
    _write_batch(deployed, "batch-2.npz", slice(FIRST_BATCH, None))

    state = retrain(root=str(deployed), return_state=True)
    result = state.result()
    assert state.name == "Promoted", state.message
    _scenario("new data batch, local DVC remote", state.name, (before.version, before.commit), deployed)
    assert result.ran == list(STAGES)
    assert all(g.passed for g in result.gates)
    assert "no_significant_regression_vs_prod" in {g.name for g in result.gates}
    assert result.comparison.n == TEST_SIZE  # a fixed test set: nothing production trained on
    assert result.promoted
    prod = registry.in_stage(deployed)
    assert prod.version != before.version and f"shrinkflow@{prod.version}" in _tags(deployed)
    assert prod.commit == registry.head(deployed) and _status(deployed) == ""
    assert "batch-2.npz" in registry.git(deployed, "ls-tree", "-r", "--name-only", prod.commit).stdout
    assert prod.record["comparison"]["n"] == TEST_SIZE
    assert "store" in result.published and store.is_dir()
    logs = _run_logs(state)
    assert "data data/raw: changed since dvc.lock" in logs

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

    result = retrain(root=str(deployed), remote="s3store")
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


def test_a_failed_gate_is_reported_not_crashed_and_leaves_the_workspace_as_it_was(deployed, prefect_stack):  # noqa: F811
    before, tags, head = _prod(deployed), _tags(deployed), registry.head(deployed)
    files = {p: (deployed / p).read_bytes() for p in ("params.yaml", "dvc.lock", "reports/metrics.json", "reports/report.md")}
    proc = prefect(prefect_stack, "deployment", "run", "retrain/nightly", "--param",
                   'overrides=["evaluate.gates.min_compression_ratio=1000"]', "--watch", "--watch-timeout", "300", cwd=deployed)
    assert proc.returncode == 1
    assert "finished in state 'Rejected'" in proc.stdout
    _scenario("impossible evaluate gate (deployment, --watch)", "Rejected", before, deployed)
    assert "min_compression_ratio" in proc.stdout  # the reason is in what --watch shows
    logs = _logs_of_last_run("retrain/nightly", wait_for=("Finished in state Rejected",))
    assert "Traceback" not in logs and "unexpected exception" not in logs
    assert "not promoted: min_compression_ratio" in logs and "production unchanged" in logs
    # production, tags, HEAD and every file as before; git and DVC see no change
    assert (_prod(deployed), _tags(deployed), registry.head(deployed)) == (before, tags, head)
    assert _status(deployed) == ""
    assert {p: (deployed / p).read_bytes() for p in files} == files
    assert "up to date" in dvc(deployed, "status").stdout
    # the candidate is kept on a branch, with its reports
    kept = [b for b in registry.git(deployed, "branch", "--format=%(refname:short)").stdout.split() if b.startswith("rejected/shrinkflow/")]
    assert kept, "the rejected candidate was not kept"
    shown = registry.git(deployed, "show", f"{kept[-1]}:params.yaml").stdout
    assert "min_compression_ratio: 1000" in shown
    assert "min_compression_ratio" in registry.git(deployed, "log", "-1", "--format=%B", kept[-1]).stdout


def test_a_failed_class_gate_blocks_promotion_and_the_run_shows_what_changed(deployed):
    from prefect.artifacts import Artifact

    from flows.retrain import retrain

    before, tags = _prod(deployed), _tags(deployed)
    # No class may lose anything: only evaluate reruns, and the seeded student loses at least one input of some class.
    state = retrain(root=str(deployed), overrides=["evaluate.gates.max_class_drop=0"], return_state=True)
    assert state.is_failed() and state.name == "Rejected", state.message
    found = re.search(r"max_class_drop = ([0-9.e+-]+) \(limit 0\)", state.message)
    assert found and float(found.group(1)) > 0, state.message
    assert _prod(deployed) == before and _tags(deployed) == tags  # production unchanged
    decision = Artifact.get("retrain-decision")
    assert decision.flow_run_id == state.state_details.flow_run_id
    assert "| teacher |" in decision.data and "not promoted: max_class_drop" in decision.data
    changes = Artifact.get("retrain-changes")
    assert changes.flow_run_id == state.state_details.flow_run_id
    assert "| student |" in changes.data and "newly wrong" in changes.data
    assert "| max_class_drop |" in changes.data and "**FAIL** | class " in changes.data


# --------------------------------------------------------------------------- git remotes


def test_a_refusing_origin_fails_the_run_before_production_moves_then_a_later_run_pushes_what_is_missing(deployed, tmp_path):
    from flows.retrain import retrain

    # a non-bare clone refuses a push to its checked-out branch
    refusing = tmp_path / "working-copy"
    sh(["git", "clone", "-q", str(deployed), str(refusing)], tmp_path)
    registry.git(deployed, "remote", "add", "origin", str(refusing))
    before, tags, head, theirs = _prod(deployed), _tags(deployed), registry.head(deployed), _remote_refs(deployed)
    change = ["evaluate.min_run_time=0.07"]  # a new candidate, cheap: only evaluate reruns

    t0 = time.monotonic()
    state = retrain(root=str(deployed), overrides=change, return_state=True)
    refused_s = time.monotonic() - t0
    assert state.is_failed() and state.name == "Failed", state.message
    _scenario("origin refuses the push (non-bare working copy)", state.name, before, deployed)
    assert "refused" in state.message and "production unchanged" in state.message
    assert (_prod(deployed), _tags(deployed), registry.head(deployed)) == (before, tags, head)
    assert _status(deployed) == ""
    assert _remote_refs(deployed) == theirs  # nothing of it reached origin
    print(f"refused push: run ended Failed after {refused_s:.1f} s (no retries for a refusal)")

    # origin becomes an empty bare repository: the next run pushes the branch, every old tag and the new ones
    bare = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    registry.git(deployed, "remote", "set-url", "origin", str(bare))
    state = retrain(root=str(deployed), overrides=change, return_state=True)
    assert state.name == "Promoted", state.message
    _scenario("same candidate, origin now an empty bare repo", state.name, before, deployed)
    prod = registry.in_stage(deployed)
    refs = _remote_refs(deployed)
    branch = registry.branch(deployed)
    assert refs[f"refs/heads/{branch}"] == registry.head(deployed) == prod.commit
    assert {f"refs/tags/{t}" for t in registry.registry_tags(deployed)} <= set(refs)
    assert _status(deployed) == ""


def test_a_refused_assignment_is_rolled_back_and_the_next_run_promotes(deployed, tmp_path):
    from flows.retrain import retrain

    bare = Path(registry.git(deployed, "remote", "get-url", "origin").stdout.strip())
    hook = bare / "hooks" / "pre-receive"
    hook.write_text('#!/bin/sh\nwhile read old new ref; do case "$ref" in *"#prod#"*) echo "prod is frozen" >&2; exit 1;; esac; done\n')
    hook.chmod(0o755)
    before, tags = _prod(deployed), _tags(deployed)
    change = ["evaluate.min_run_time=0.08"]
    state = retrain(root=str(deployed), overrides=change, return_state=True)
    assert state.name == "Failed" and "rolled back" in state.message, state.message
    _scenario("origin refuses the prod tag (pre-receive hook)", state.name, before, deployed)
    assert _prod(deployed) == before and _tags(deployed) == tags  # no local tag survives the refusal
    refs = _remote_refs(deployed)
    assert refs[f"refs/heads/{registry.branch(deployed)}"] == registry.head(deployed)  # the candidate commit is published
    assert _status(deployed) == ""

    hook.unlink()
    state = retrain(root=str(deployed), overrides=change, return_state=True)
    assert state.name == "Promoted", state.message
    _scenario("next run after the refused tag", state.name, before, deployed)
    assert state.result().ran == []  # the committed candidate, promoted as it is
    prod = registry.in_stage(deployed)
    assert prod.commit == registry.head(deployed) and f"refs/tags/shrinkflow@{prod.version}" in _remote_refs(deployed)


# ----------------------------------------------------------------------- the paired gate


def test_paired_gate_accepts_another_seed_of_the_same_model(deployed):
    from flows.retrain import result_of, retrain

    set_params(deployed, ["seed=1"])  # an operator's edit of params.yaml: committed with the candidate if promoted
    before = _prod(deployed)
    state = retrain(root=str(deployed), return_state=True)
    _scenario("same config, seed 1 (noise)", state.name, before, deployed)
    result = result_of(state)
    logs = _run_logs(state)
    assert "data data/raw: unchanged since dvc.lock" in logs and "data stage out of date: params seed modified" in logs
    c = result.comparison
    print(f"seed 1 vs production: {c.describe()}; the plain gate at 0 would {'reject' if c.difference < 0 else 'pass'} it")
    assert state.name == "Promoted", state.message
    assert set(result.ran) == set(STAGES)  # the seed changes the split and the initialisation: everything reruns
    assert c.n == TEST_SIZE and not c.worse and c.high >= 0
    assert "Candidate vs production" in _artifact(state)


def test_paired_gate_rejects_a_model_with_one_class_damaged(deployed):
    from flows.retrain import result_of, retrain

    batches = {name: (deployed / "data/raw" / name).read_bytes() for name in ("batch-1.npz", "batch-2.npz")}
    before, head = _prod(deployed), registry.head(deployed)
    # new data in which all but 10 of the training 3s are labelled 8 (the data stage refuses a
    # class with no training row at all); the test digits stay right
    _write_batch(deployed, "batch-1.npz", slice(0, FIRST_BATCH), with_test=True, relabel=(3, 8, 10))
    _write_batch(deployed, "batch-2.npz", slice(FIRST_BATCH, None), relabel=(3, 8, 0))
    status = _status(deployed)
    try:
        state = retrain(root=str(deployed), return_state=True)
        result = result_of(state)
        _scenario("most training 3s labelled 8 (real regression)", state.name, before, deployed, status)
        assert state.name == "Rejected", state.message
        failed = {g.name for g in result.gates if not g.passed}
        assert failed == {"no_significant_regression_vs_prod"}, result.gates  # evaluate's own gates pass
        c = result.comparison
        print(f"class 3 damaged vs production: {c.describe()}")
        assert c.worse and c.high < 0 and c.losses > 3 * c.wins
        assert "no_significant_regression_vs_prod" in state.message and "pp" in state.message
        artifact = _artifact(state)
        assert "significantly worse" in artifact and "Decision:** not promoted" in artifact
        assert (_prod(deployed), registry.head(deployed)) == (before, head)
        assert _status(deployed) == status  # the data dropped in is the user's: it stays
    finally:
        for name, data in batches.items():
            (deployed / "data/raw" / name).write_bytes(data)
    assert _status(deployed) == ""


# ------------------------------------------------------------------ docs/production.md

DOC = REPO / "docs" / "production.md"
#: The long-running commands of the docs, run as written (the port replaced) by the signal tests below.
DOC_SERVE = ["make serve", "shrinkflow serve --port 4200 --poll 1"]


def _doc_blocks() -> list[list[str]]:
    """The command lines of each ```bash block of docs/production.md (comments and blank lines dropped)."""
    import re

    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [[ln.split("  #")[0].strip() for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")] for b in blocks]


def test_the_commands_of_docs_production_md_run(deployed, prefect_stack, s3_endpoint, tmp_path):  # noqa: F811
    """Every bash block of the docs, run as a script (port, paths and credentials replaced by the test's)."""
    port = prefect_stack.api_url.split(":")[-1].split("/")[0]
    work = tmp_path / "work"
    work.mkdir()
    clone = work / "clone"
    sh(["git", "clone", "-q", str(deployed), str(clone)], work)
    subst = {"4200": port, "s3://my-bucket": f"s3://{s3_endpoint.bucket}", "https://minio.example:9000": s3_endpoint.url,
             "my-key": "testing", "my-secret": "testing"}
    env = {**project_env(), **s3_endpoint.env, "PREFECT_API_URL": prefect_stack.api_url, "PREFECT_HOME": prefect_stack.env["PREFECT_HOME"]}

    def no_remotes() -> None:  # the docs start from a project without DVC remotes; earlier tests committed one
        config = (clone / ".dvc" / "config").read_text()  # `dvc remote list` wraps long lines: read the file
        names = re.findall(r"""^\[\s*'remote "([^"]+)"'\s*\]""", config, re.M)
        for name in names:
            dvc(clone, "remote", "remove", name)
        if names:
            sh(["git", "commit", "-qm", "no DVC remotes", ".dvc/config"], clone)

    def prepare_origin() -> None:  # what a promoting retrain run leaves there: the project, pushed
        registry.git(clone, "remote", "remove", "origin")
        sh(["git", "clone", "-q", "--bare", str(deployed), str(work / "shrinkflow.git")], work)

    # first command of a block → (where it runs, what to prepare, what its output must show)
    plan = {
        "make serve": None,  # DOC_SERVE: the signal tests run these
        "export PREFECT_API_URL=http://127.0.0.1:4200/api": (deployed, None, ["finished successfully in 'Unchanged'", "finished successfully in 'Completed'"]),
        "prefect deployment run 'retrain/nightly' --param significance=0.01 --watch": (deployed, None, ["finished successfully in 'Evaluated'"]),
        "prefect deployment schedule ls retrain/nightly": (deployed, None, ["0 2 * * *", "Resumed"]),
        "gto show shrinkflow": (deployed, None, ["shrinkflow@v0.0.", "# shrinkflow report", "min_compression_ratio"]),
        "dvc remote add -d store ../shrinkflow-store && git commit -m \"DVC remote\" .dvc/config": (clone, no_remotes, []),
        "dvc remote add -d s3 s3://my-bucket/shrinkflow": (clone, None, []),
        "git remote add origin ../shrinkflow.git": (clone, prepare_origin, []),
        "git clone ../shrinkflow.git fresh && cd fresh && dvc pull --run-cache && dvc repro": (clone, None, ["didn't change"]),
        "prefect work-pool create shrinkflow-docker --type docker": (deployed, None, ["shrinkflow-docker", "shrinkflow-k8s"]),
    }
    blocks = _doc_blocks()
    assert {b[0] for b in blocks} == set(plan), "a bash block of docs/production.md this test does not run: add it to the plan"
    for block in blocks:
        if plan[block[0]] is None:
            assert block == DOC_SERVE
            continue
        cwd, prepare, expect = plan[block[0]]
        if prepare is not None:
            prepare()
        script = "\n".join(block)
        for old, new in subst.items():
            script = script.replace(old, new)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script}\n--- exit {proc.returncode}\n{out[-4000:]}"
        for text in expect:
            assert text in out, f"{script}\n--- {text!r} not in:\n{out[-4000:]}"
        if block[0].startswith("prefect work-pool create"):
            assert "shrinkflow-k8s" in prefect(prefect_stack, "work-pool", "ls").stdout
    _pause_schedules(prefect_stack)  # the docs resume the cron schedule
    assert _status(deployed) == ""


# ------------------------------------------------------------------------- serve signals

SLEEPER = '''"""A busy flow run: it started a process that ignores SIGTERM, in a session of its own."""
import subprocess
import sys
import time

from prefect import flow

STUCK = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


@flow
def sleeper(seconds: float = 600) -> None:
    subprocess.Popen([sys.executable, "-c", STUCK], start_new_session=True)
    time.sleep(seconds)
'''


@pytest.fixture(scope="module")
def serve_project(tmp_path_factory) -> Path:
    """A project whose prefect.yaml also deploys ``sleeper/busy``, a flow whose run only SIGKILL ends."""
    import yaml

    root = make_project(tmp_path_factory.mktemp("serve") / "proj")
    (root / "sleeper.py").write_text(SLEEPER)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec["deployments"] = [{**d, "schedules": []} for d in spec["deployments"]]  # no 02:00 runs here
    spec["deployments"].append({"name": "busy", "entrypoint": "sleeper.py:sleeper", "work_pool": spec["deployments"][0]["work_pool"]})
    (root / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _commit_all(root, "a sleeper deployment")
    return root


def _serve_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {**project_env(), "PREFECT_HOME": str(home), "PORT": str(port), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _assert_all_gone(proc: subprocess.Popen, home: Path, port: int, log: Path) -> str:
    proc.wait(120)
    out = log.read_text(errors="replace")
    from servers import stack_processes

    left = stack_processes(home)
    assert not left, f"left running: {left}\n{out[-3000:]}"
    assert serve.port_is_free("127.0.0.1", port), out[-3000:]
    assert "stopped: no process of this stack is left" in out and f"port {port} is free" in out, out[-3000:]
    assert "everything started was stopped" not in out
    return out


def test_make_serve_stops_everything_on_one_sigterm(serve_project, tmp_path):
    import os
    import signal

    from servers import start_in_terminal, wait_for_output

    home, port, log = tmp_path / "home", serve.free_port(), tmp_path / "serve.log"
    proc = start_in_terminal(DOC_SERVE[0].split(), REPO, _serve_env(home, port, SERVE_ARGS=f"--root {serve_project} --poll 1"), log)
    wait_for_output(proc, log, "ready in")
    os.kill(proc.pid, signal.SIGTERM)  # make's own pid: make passes the first SIGTERM on to shrinkflow serve
    out = _assert_all_gone(proc, home, port, log)
    assert "SIGTERM: stopping worker" in out and "server (pid" in out and "stopped by SIGTERM" in out


def test_two_sigterms_with_a_flow_run_in_flight_escalate_to_sigkill_and_leave_nothing(serve_project, tmp_path):
    import os
    import signal

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from servers import start_in_terminal, wait_for_output

    home, port, log = tmp_path / "home", serve.free_port(), tmp_path / "serve.log"
    proc = start_in_terminal(DOC_SERVE[0].split(), REPO, _serve_env(home, port, SERVE_ARGS=f"--root {serve_project} --poll 1"), log)
    wait_for_output(proc, log, "ready in")
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sleeper/busy")
        run = client.create_flow_run_from_deployment(dep.id)
        deadline = time.monotonic() + 180
        while not (state := client.read_flow_run(run.id).state).is_running():
            assert time.monotonic() < deadline and not state.is_final(), state
            time.sleep(0.5)
    time.sleep(2)  # the flow body has started its stuck process
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd or `kill -- -PGID` does: make and serve both get it
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)
    out = _assert_all_gone(proc, home, port, log)
    assert "signal received again" in out and "it started (flow runs) still running" in out and "killed (SIGKILL)" in out, out[-3000:]


def test_sigint_during_start_up_stops_what_was_started(serve_project, tmp_path):
    import os
    import signal

    from servers import stack_processes, start_in_terminal

    home, port, log = tmp_path / "home", serve.free_port(), tmp_path / "serve.log"
    # the command docs/production.md gives, with the test's port, started as from a terminal
    cmd = DOC_SERVE[1].replace("4200", str(port)).split()
    proc = start_in_terminal(cmd, serve_project, _serve_env(home, port), log)
    deadline = time.monotonic() + 120
    while not any("server start" in p for p in stack_processes(home)):  # the server process exists
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    out = _assert_all_gone(proc, home, port, log)
    assert "SIGINT during start-up" in out and "ready in" not in out
    assert proc.returncode == 0
