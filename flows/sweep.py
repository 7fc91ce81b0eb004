"""The sweep flow: trials of the compress chain on Dask, searched by Optuna.

Wiring only: ``flows.ops.sweep.Scheduler`` plans and schedules against the Optuna study,
``flows.ops.trials.run_trial`` runs one trial; this module makes them Prefect tasks on a
Dask task runner. Teachers are trained once per distinct teacher config (a ``teacher``
task) before the trials that share them start; those trials then restore it from DVC's
run-cache.

Run with ``shrinkflow sweep SWEEP.yaml`` (a LocalCluster) or ``--address tcp://HOST:8786``
(an existing Dask scheduler; see docs/sweeps.md); ``--resume`` continues the study.
Calling ``sweep`` directly (or deploying it) uses a 2-worker LocalCluster; ``run_sweep``
picks the runner from the sweep file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from flows.ops.sweep import Plan, Scheduler, plan, preflight, sweep_lock
from flows.ops.trials import run_trial
from schemas.sweep import TrialResult, TrialSpec


@task(cache_policy=NO_CACHE, retries=0, task_run_name="trial-{spec.index}")
def trial(spec: TrialSpec) -> TrialResult:
    """One trial: the whole chain in a fresh workspace (never raises; failures are results)."""
    return run_trial(spec)


@task(cache_policy=NO_CACHE, retries=0, task_run_name="teacher-for-trial-{spec.index}")
def teacher(spec: TrialSpec) -> TrialResult:
    """Reproduce up to the teacher once, so the trials sharing it restore it from the run-cache."""
    return run_trial(spec)


def task_runner(address: str | None = None, workers: int = 2) -> DaskTaskRunner:
    """An existing scheduler at ``address``, else a LocalCluster of single-threaded worker processes."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,  # one trial per worker process at a time
            "processes": True,  # DVC's repo lock is per process: never two trials in one process
            "host": "127.0.0.1",
            "dashboard_address": None,
        }
    )


@flow(name="sweep", task_runner=task_runner())
def sweep(
    sweep_file: str, root: str = ".", address: str | None = None, workers: int | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the sweep described by ``sweep_file`` against the project at ``root``.

    Returns the summary written to ``<output>/summary.json``; results are rewritten
    after every finished trial, so the best passing config so far is always on disk.
    """
    log = get_run_logger()
    p: Plan = plan(sweep_file, root, address=address, workers=workers)
    with sweep_lock(p.out):
        summary = Scheduler(
            p, submit_trial=trial.submit, submit_teacher=teacher.submit,
            first_done=lambda futures: next(as_completed(futures)), log=log.info, resume=resume,
        ).run()
    s = p.sweep
    create_markdown_artifact(
        key=f"sweep-{s.name}".lower().replace("_", "-").replace(".", "-"),
        markdown=(p.out / "results.md").read_text(),
        description=f"Sweep {s.name}: results and chosen config",
    )
    return summary


def run_sweep(
    sweep_file: str | Path,
    root: str | Path = ".",
    *,
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    checked: Plan | None = None,
) -> dict[str, Any]:
    """Validate, then run the sweep flow on a Dask cluster built from the sweep's ``cluster`` section.

    ``checked``: the plan of these very arguments when the caller has validated them
    already, preflight included (the flow itself plans again: it is also an entry point of its own).
    """
    p = checked
    if p is None:  # bad input fails before Prefect starts; so does a study that exists without --resume
        p = plan(sweep_file, root, address=address, workers=workers)
        preflight(p, resume)
    runner = task_runner(p.sweep.cluster.address, p.sweep.cluster.workers)
    with _shared_ephemeral_api():
        return sweep.with_options(task_runner=runner)(
            sweep_file=str(Path(sweep_file).resolve()), root=str(p.root), address=address, workers=workers, resume=resume
        )


@contextmanager
def _shared_ephemeral_api() -> Iterator[None]:
    """Without PREFECT_API_URL, start the ephemeral API here and hand its URL to the Dask workers.

    Otherwise each LocalCluster worker process starts an ephemeral server of its own
    (seconds each, and their task runs never reach the flow's server).
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same singleton Prefect's own client would start
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the worker processes
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
