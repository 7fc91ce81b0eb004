"""Sweeps end to end through `shrinkflow sweep`, on digits with tiny trials.

- On the default LocalCluster: a sweep killed with SIGKILL mid-trial (the CLI and every
  process under it) resumes with --resume, rerunning no finished trial.
- On an external cluster: `dask scheduler` and two `dask worker` processes on 127.0.0.1
  (reporting to a real Prefect server), an `auto` sweep against that address. Every
  process a test starts, it stops.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import BIN, FAST, make_project, project_env, set_params, sh

from flows.ops import serve
from flows.ops.sweep import wait_for_workers
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
    root = make_project(tmp_path_factory.mktemp("sweepdask") / "proj")
    set_params(root, FAST)
    return root


def write(tmp_path: Path, sweep: dict) -> Path:
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def cli(proj: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    env = env or project_env({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"})
    return sh([str(BIN / "shrinkflow"), "sweep", *args, "--root", str(proj)], proj, env=env, check=False, timeout=900)


def rows_of(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "results.csv").open()))


def test_killed_sweep_resumes_without_rerunning_finished_trials(proj, tmp_path):
    import optuna

    sweep = write(tmp_path, {
        "name": "resume", "set": TINY, "space": {"prune.sparsity": [0.5, 0.9, 0.95]},
        "criterion": {"max_drop": 0.05}, "cluster": {"workers": 1}, "workdir": str(tmp_path),
    })
    out = proj / "sweeps" / "resume"
    env = project_env({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"})
    log = tmp_path / "first.log"
    first = serve._spawn([str(BIN / "shrinkflow"), "sweep", str(sweep), "--root", str(proj)], env, log, cwd=proj)
    try:
        # Wait until one trial finished and the next one is well under way, then kill everything with SIGKILL.
        deadline = time.monotonic() + 600
        while True:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            states = _states(out / "study.db", "resume")
            if states.count("COMPLETE") >= 1 and "RUNNING" in states:
                break
            time.sleep(1)
        time.sleep(4)  # mid-trial: its DVC run is going
        tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        assert any("dvc" in " ".join(p.cmdline()) for p in tree if p.is_running()), "no trial was running"
        for p in tree:
            with _gone():
                p.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, alive
    finally:
        serve.stop(first, grace=1)
    before = {r["trial"]: r for r in rows_of(out)}
    killed = _states(out / "study.db", "resume")
    assert killed.count("RUNNING") == 1, killed
    finished = {t for t, r in before.items() if r["status"] == "done"}
    assert finished

    # Without --resume: refused with exit 2 before anything runs, nothing touched.
    proc = cli(proj, tmp_path, str(sweep), env=env)
    assert proc.returncode == 2 and "--resume" in proc.stderr, proc.stderr
    assert {r["trial"]: r for r in rows_of(out)} == before

    proc = cli(proj, tmp_path, str(sweep), "--resume", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = rows_of(out)
    after = {r["trial"]: r for r in rows}
    # Finished trials were not rerun: their rows (pid, start, seconds, metrics) are the first run's.
    for t in finished:
        assert after[t] == before[t]
    # The interrupted trial is recorded as such, and its point ran again to the end.
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'study.db'}")
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and after[str(interrupted[0].number)]["status"] == "interrupted"
    rerun = [t for t in study.trials if t.user_attrs.get("rerun_of") == interrupted[0].number]
    assert len(rerun) == 1 and after[str(rerun[0].number)]["status"] == "done"
    done = [r for r in rows if r["status"] == "done"]
    assert sorted(float(r["prune.sparsity"]) for r in done) == [0.5, 0.9, 0.95]  # each point done exactly once
    assert summary["done"] == 3 and summary["chosen"] is not None
    for r in done:
        assert METRIC_KEYS <= {k for k, v in r.items() if v != ""}, r
    best = load_params(out / "best-params.yaml", root=proj)
    assert best.prune.sparsity == summary["chosen"]["point"]["prune.sparsity"]
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "importances.png").stat().st_size > 1000


def _states(db: Path, name: str) -> list[str]:
    import optuna

    if not db.is_file():
        return []
    try:
        return [t.state.name for t in optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials]
    except (KeyError, Exception):  # the study is being created
        return []


class _gone:
    """Ignore a process that already exited."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)


# ------------------------------------------------------------------ an external cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    """A Prefect server, `dask scheduler` and two `dask worker` processes on 127.0.0.1; all stopped after."""
    home = tmp_path_factory.mktemp("cluster")
    procs = []
    stack = serve.start_server(home / "prefect", logs=home / "logs")
    try:
        port = serve.free_port()
        address = f"tcp://127.0.0.1:{port}"
        env = project_env({"PREFECT_API_URL": stack.api_url, "PREFECT_HOME": str(home / "prefect"),
                           "PREFECT_LOGGING_LEVEL": "WARNING"})
        procs.append(serve._spawn([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], env, home / "logs" / "scheduler.log", cwd=home))
        for i in range(2):
            procs.append(serve._spawn([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                       "--no-dashboard", "--name", f"w{i}"], env, home / "logs" / f"worker{i}.log", cwd=home))
        wait_for_workers(address, 2)
        yield {"address": address, "env": env, "pids": [p.pid for p in procs]}
    finally:
        for p in reversed(procs):
            serve.stop(p, grace=10)
        stack.close()
    assert not [p.pid for p in procs if p.poll() is None]


def test_auto_sweep_on_an_external_dask_cluster(proj, tmp_path, cluster):
    max_drop = 0.03
    sweep = write(tmp_path, {
        "name": "external", "set": TINY,
        "space": {"prune.sparsity": [0.5, 0.9, 0.99], "distill.student": ["compressed", BROKEN_STUDENT]},
        "search": {"mode": "auto", "seed": 4}, "criterion": {"max_drop": max_drop}, "objective": "size",
        "budget": {"trials": 4, "seconds": 900}, "workdir": str(tmp_path),
        "cluster": {"threads_per_trial": 1},
    })
    proc = cli(proj, tmp_path, str(sweep), "--address", cluster["address"], env=cluster["env"])
    out = proj / "sweeps" / "external"
    assert (out / "summary.json").is_file(), proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = rows_of(out)
    assert summary["trials"] == 4, summary
    # Trials ran in the two external worker processes (the nannies' children), never in the CLI's own.
    worker_pids = {c.pid for pid in cluster["pids"][1:] for c in psutil.Process(pid).children(recursive=True)}
    assert {int(r["pid"]) for r in rows if int(r["pid"]) > 0} <= worker_pids, (rows, worker_pids)
    assert len({int(r["pid"]) for r in rows}) == 2
    broken = [r for r in rows if "torch.nn:Linear" in r["distill.student"]]
    sound = [r for r in rows if r not in broken]
    assert broken and sound
    for r in broken:  # recorded as failed, with the stage and the reason
        assert r["status"] == "failed" and r["reason"].startswith("distill:") and "torch.nn:Linear" in r["reason"], r
    # One teacher task; every sound trial restored its teacher from the shared DVC cache.
    assert len(summary["teachers"]) == 1
    for r in sound:
        assert r["status"] in ("done", "pruned") and "train_teacher" not in r["ran"].split(), r
    # auto found a passing config, the smallest sound trial that passes, and recorded it.
    assert proc.returncode == 0 and summary["chosen"] is not None, proc.stdout + proc.stderr
    passing = [r for r in sound if r["status"] == "done" and float(r["teacher_accuracy"]) - float(r["accuracy"]) <= max_drop + 1e-12]
    chosen = next(r for r in rows if int(r["trial"]) == summary["chosen"]["trial"])
    assert chosen in passing and int(chosen["size_bytes"]) == min(int(r["size_bytes"]) for r in passing)
    best = load_params(out / "best-params.yaml", root=proj)
    assert best.prune.sparsity == float(chosen["prune.sparsity"]) and best.distill.student == "compressed"
    assert (out / "trials" / f"{int(chosen['trial']):03d}" / "report.md").is_file()
    assert os.getpid() not in {int(r["pid"]) for r in rows}
