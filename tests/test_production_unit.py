"""Fast checks of the production helpers: the GTO registry and candidate commits on a tiny
git repo, git remotes that accept or refuse, the workspace snapshot on a tiny DVC
pipeline, the paired comparison's statistics, process stopping by PID and signal
bookkeeping, and retrain parameter checks that need no server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, project_env, sh

from flows.ops import publish, registry, serve
from shrinkflow.compare import paired_comparison, unseen
from shrinkflow.errors import ParamsError, ShrinkflowError


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
    assert set(registry.registry_tags(repo)) == {"shrinkflow@v0.0.1", "shrinkflow#prod#1"}

    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert not registry.same_model(repo, prod.commit, None)  # the working tree differs
    (repo / "reports").mkdir()
    (repo / "reports" / "metrics.json").write_text("{}")
    start = registry.head(repo)
    c = registry.candidate_commit(repo, ["dvc.lock", "missing.yaml"], "candidate", force=["reports/metrics.json"])
    assert c != start and registry.head(repo) == start  # built aside: the branch did not move
    assert registry.git(repo, "diff", "--cached", "--name-only").stdout == ""  # and the index is untouched
    assert sorted(registry.committed_paths(repo, c)) == ["dvc.lock", "reports/metrics.json"]  # ignored, committed on purpose
    registry.advance(repo, c, start)
    assert registry.head(repo) == c and registry.git(repo, "status", "--porcelain").stdout == ""
    assert not registry.same_model(repo, prod.commit)
    assert registry.candidate_commit(repo, ["dvc.lock"], "nothing new") == c
    with pytest.raises(ShrinkflowError, match="update-ref"):  # HEAD is no longer where the caller thinks
        registry.advance(repo, start, "0" * 40)

    v2 = registry.register_and_assign(repo, {"metrics": {"accuracy": 0.95}})
    assert v2.version == "v0.0.2" and registry.in_stage(repo).version == "v0.0.2"
    registry.delete_tags(repo, ["shrinkflow@v0.0.2", "shrinkflow#prod#2"])  # a rollback
    assert registry.in_stage(repo).version == "v0.0.1"


def test_a_rejected_candidate_is_archived_on_a_branch_without_touching_the_workspace(repo):
    start = registry.head(repo)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {rejected: {}}\n")
    c = registry.candidate_commit(repo, ["dvc.lock"], "shrinkflow candidate, not promoted: a gate failed")
    b1, b2 = registry.archive(repo, c), registry.archive(repo, c)
    assert b1.startswith("rejected/shrinkflow/") and b2 != b1  # two in one second get distinct names
    assert registry.head(repo) == start and registry.branch(repo) in ("master", "main")
    assert "rejected: {}" in registry.git(repo, "show", f"{b1}:dvc.lock").stdout
    assert "a gate failed" in registry.git(repo, "log", "-1", "--format=%B", b1).stdout


def test_an_atomic_push_to_a_refusing_remote_is_a_refusal_and_pushes_nothing(repo, tmp_path):
    refusing = tmp_path / "working-copy"  # non-bare: refuses a push to its checked-out branch
    sh(["git", "clone", "-q", str(repo), str(refusing)], tmp_path)
    registry.git(repo, "remote", "add", "origin", str(refusing))
    assert publish.has_git_remote(repo, "origin") and not publish.has_git_remote(repo, "upstream")
    registry.register_and_assign(repo, {"metrics": {}})
    branch = registry.branch(repo)
    c = registry.candidate_commit(repo, ["new.txt"], "x") if (repo / "new.txt").write_text("x") else None
    assert publish.missing_tags(repo, "origin", registry.registry_tags(repo)) == ["shrinkflow#prod#1", "shrinkflow@v0.0.1"]
    with pytest.raises(publish.PushFailed, match="refused") as err:
        publish.push_git(repo, "origin", [f"{c}:refs/heads/{branch}", "refs/tags/shrinkflow@v0.0.1"])
    assert err.value.rejected
    assert publish.remote_refs(repo, "origin", ["refs/tags/shrinkflow@v0.0.1"]) == {}  # atomic: the tag did not go either

    bare = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    registry.git(repo, "remote", "set-url", "origin", str(bare))
    publish.push_git(repo, "origin", [f"{c}:refs/heads/{branch}", "refs/tags/shrinkflow@v0.0.1"])
    assert publish.remote_refs(repo, "origin", [f"refs/heads/{branch}"]) == {f"refs/heads/{branch}": c}
    assert publish.missing_tags(repo, "origin", registry.registry_tags(repo)) == ["shrinkflow#prod#1"]
    registry.git(repo, "remote", "set-url", "origin", str(tmp_path / "nowhere"))
    with pytest.raises(publish.PushFailed) as err:
        publish.push_git(repo, "origin", ["refs/tags/shrinkflow#prod#1"])
    assert not err.value.rejected  # unreachable, not refused: worth a retry


DVC_YAML = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    params: [n]
    outs: [out]
    metrics:
      - reports/metrics.json: {cache: false}
"""
MAKE_PY = """import json, pathlib, yaml
n = yaml.safe_load(open("params.yaml"))["n"]
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/model.bin").write_text(str(n))
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/metrics.json").write_text(json.dumps({"n": n}))
"""


def test_snapshot_restores_params_lock_reports_and_dvc_outputs(tmp_path, monkeypatch):
    from flows.ops.dvcrepo import Snapshot, pipeline_outputs

    for k, v in project_env().items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "make.py").write_text(MAKE_PY)
    (root / "params.yaml").write_text("n: 1\n")
    (root / ".gitignore").write_text("/out/\n/reports/\n")
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh([str(BIN / "dvc"), "repro", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "add", "-f", "reports/metrics.json"], root)
    sh(["git", "commit", "-q", "-m", "n=1"], root)
    assert pipeline_outputs(root) == (["out"], ["reports/metrics.json"])

    (root / "untracked.txt").write_text("the user's")  # dirt from before the run stays
    snap = Snapshot.take(root, "data")
    (root / "params.yaml").write_text("n: 2\n")
    sh([str(BIN / "dvc"), "repro", "-q"], root)
    assert (root / "out/model.bin").read_text() == "2"
    assert snap.restore() == []
    snap.close()
    assert (root / "out/model.bin").read_text() == "1" and (root / "params.yaml").read_text() == "n: 1\n"
    assert sh(["git", "status", "--porcelain"], root).stdout == "?? untracked.txt\n"
    assert "up to date" in sh([str(BIN / "dvc"), "status"], root).stdout


def test_a_returned_rejection_is_not_logged_as_a_crash_but_other_errors_are():
    import logging

    from flows.retrain import NotPromoted, RetrainResult, _ExpectedOutcome

    result = RetrainResult(ran=[], gates=[], version=None, promoted=False, decision="not promoted: a gate failed")
    assert any(isinstance(f, _ExpectedOutcome) for f in logging.getLogger("prefect.flow_runs").filters)

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.getLogger("prefect.flow_runs").makeRecord(
                "prefect.flow_runs", logging.ERROR, __file__, 1, "Engine execution exited with unexpected exception", (), sys.exc_info())

    assert not _ExpectedOutcome().filter(record(NotPromoted(result.decision, result)))
    assert _ExpectedOutcome().filter(record(RuntimeError("a bug")))  # a real crash keeps its traceback


def test_why_the_data_stage_is_out_of_date_names_data_params_and_code_apart():
    from flows.retrain import _why_out_of_date

    status = {"data": [{"changed deps": {"data/raw": "modified", "shrinkflow/data.py": "modified",
                                         "params.yaml": {"data.val_fraction": "modified"}}}]}
    assert _why_out_of_date(status, "data/raw") == (
        True, ["data/raw modified", "shrinkflow/data.py modified", "params data.val_fraction modified"])
    params_only = {"data": [{"changed deps": {"params.yaml": {"data": "modified"}}}]}
    assert _why_out_of_date(params_only, "data/raw") == (False, ["params data modified"])
    assert _why_out_of_date({}, "data/raw") == (False, [])


# ------------------------------------------------------------------- the paired comparison


def _logits(correct: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((len(y), 10))
    out[np.arange(len(y)), np.where(correct, y, (y + 1) % 10)] = 1
    return out


def test_mcnemar_exact_counts_discordant_pairs_and_its_interval_agrees_with_its_test():
    y = np.arange(360) % 10
    prod = np.ones(360, dtype=bool)
    prod[:20] = False  # production gets 340 right
    cand = prod.copy()
    cand[:2] = True  # the candidate wins 2 ...
    cand[20:30] = False  # ... and loses 10
    c = paired_comparison(_logits(prod, y), _logits(cand, y), y, "classification", 0.05)
    assert (c.wins, c.losses, c.n) == (2, 10, 360)
    assert c.difference == pytest.approx(-8 / 360)
    assert c.p_value == pytest.approx((66 + 12 + 1) / 4096)  # P(X >= 10), X ~ Binomial(12, 1/2)
    assert c.worse and c.high < 0 and "significantly worse" in c.describe()
    same = paired_comparison(_logits(prod, y), _logits(prod, y), y, "classification", 0.05)
    assert (same.p_value, same.low, same.high, same.worse) == (1.0, 0.0, 0.0, False)
    one = paired_comparison(_logits(prod, y), _logits(np.r_[prod[:-1], False], y), y, "classification", 0.05)
    assert one.losses == 1 and one.p_value == 0.5 and not one.worse  # the plain gate at 0 would reject this
    for wins in range(0, 15):  # the exact interval inverts the exact test: same decision everywhere
        for losses in range(0, 15):
            cand = prod.copy()
            cand[:wins] = True
            cand[20 : 20 + losses] = False
            r = paired_comparison(_logits(prod, y), _logits(cand, y), y, "classification", 0.05)
            assert r.worse == (r.high < 0), (wins, losses, r)


def test_regression_uses_a_paired_t_test_on_squared_errors():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((400, 1))
    prod = y + 0.1 * rng.standard_normal((400, 1))
    noise = paired_comparison(prod, y + 0.1 * rng.standard_normal((400, 1)), y, "regression", 0.05)
    assert noise.metric == "mse" and not noise.worse and noise.low < 0 < noise.high
    worse = paired_comparison(prod, y + 0.2 * rng.standard_normal((400, 1)), y, "regression", 0.05)
    assert worse.worse and worse.low > 0 and worse.difference == pytest.approx(worse.candidate - worse.production)
    assert paired_comparison(prod, prod, y, "regression", 0.05).p_value == 1.0
    with pytest.raises(ValueError, match="alpha"):
        paired_comparison(prod, prod, y, "regression", 0.5)


def test_unseen_leaves_out_the_rows_production_trained_on():
    X = np.random.default_rng(0).random((6, 1, 2, 2)).astype(np.float32)
    assert unseen(X, [X[:2], X[5:]]).tolist() == [False, False, True, True, True, False]
    assert unseen(X, [np.zeros((3, 4), np.float32)]).all()  # another shape: nothing in common


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


def test_stop_follows_a_run_into_its_own_session_and_a_repeated_signal_hurries_the_sigkill(tmp_path):
    # a "worker" that starts a "flow run" in a session of its own (as Prefect's process worker
    # does); the run ignores SIGTERM, so only SIGKILL ends it
    run = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {run!r}], start_new_session=True); time.sleep(120)"
    proc = serve._spawn([sys.executable, "-c", code], dict(project_env()), tmp_path / "w.log")
    deadline = time.monotonic() + 10
    while not (kids := subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # the run has set SIGTERM to ignore
    said: list[str] = []
    t0 = time.monotonic()
    what = serve.stop(proc, grace=60, hurry=lambda: time.monotonic() - t0 > 1, say=said.append, name="worker")
    assert time.monotonic() - t0 < 1 + serve.HURRY_S + 5  # not the 60 s grace
    assert "killed (SIGKILL)" in what and said and "gets SIGKILL" in said[0]
    assert not Path(f"/proc/{kids[0]}").exists() or Path(f"/proc/{kids[0]}/stat").read_text().split(") ")[1][0] == "Z"


def test_stop_signals_are_recorded_never_raised(tmp_path):
    import os
    import signal

    signals = serve.StopSignals()
    previous = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with signals.installed():
        signals.check()  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signals.requested and not signals.hurry
        with pytest.raises(serve.Interrupted, match="SIGTERM"):
            signals.check()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.hurry and signals.received == ["SIGTERM", "SIGINT"]
    assert signal.getsignal(signal.SIGINT) is previous  # put back


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
    from schemas.metrics import Metrics
    from tasks.evaluate import _gates

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
