"""The sweep flow: trials of the compress chain on Dask, each in its own workspace.

Wiring only; the logic is in ``flows.ops.sweep``. The flow keeps at most one trial per
Dask worker thread in flight, so that ``auto`` mode proposes each new point knowing
every finished result and a time budget never leaves a queue behind. Teachers are
trained once per distinct teacher config (a ``teacher`` task) before the trials that
share them start; those trials then restore it from DVC's run-cache.

Run with ``shrinkflow sweep SWEEP.yaml`` (a LocalCluster) or ``--address tcp://HOST:8786``
(an existing Dask scheduler; see docs/sweeps.md). Calling ``sweep`` directly (or deploying
it) uses a 2-worker LocalCluster; ``run_sweep`` picks the runner from the sweep file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from flows.ops.sweep import PREFIX_STAGE, Plan, Searcher, TrialResult, TrialSpec, plan, run_trial, write_results


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


def _failed_from_exception(spec: TrialSpec, exc: BaseException) -> TrialResult:
    return TrialResult(
        index=spec.index, point=spec.point, overrides=spec.overrides, status="failed",
        reason=f"worker: {type(exc).__name__}: {exc}", pid=-1, host="?", seconds=0.0,
    )


@flow(name="sweep", task_runner=task_runner())
def sweep(sweep_file: str, root: str = ".", address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run the sweep described by ``sweep_file`` against the project at ``root``.

    Returns the summary written to ``<output>/summary.json``; results are rewritten
    after every finished trial, so the best passing config so far is always on disk.
    """
    log = get_run_logger()
    p: Plan = plan(sweep_file, root, address=address, workers=workers)
    s = p.sweep
    start = time.time()
    deadline = start + s.budget.seconds if s.budget.seconds else None
    searcher = Searcher(p)
    results: list[TrialResult] = []
    teachers: dict[str, str] = {}  # prefix key -> "pending" | "done" | failure reason
    teacher_log: list[dict[str, Any]] = []
    parked: list[tuple[str, TrialSpec]] = []  # trials waiting for their teacher
    in_flight: dict[Any, tuple[str, str | None, TrialSpec]] = {}  # future -> (kind, prefix key, spec)
    n = 0

    def finish(res: TrialResult) -> None:
        results.append(res)
        searcher.observe(res)
        log.info("trial %d %s %s%s", res.index, res.point, res.status, f": {res.reason}" if res.reason else "")
        write_results(p, results, time.time() - start, final=False)

    while True:
        while len(in_flight) < p.slots and not (deadline and time.time() >= deadline):
            ready = next((x for x in parked if teachers.get(x[0]) != "pending"), None)
            if ready is not None:
                parked.remove(ready)
                key, spec = ready
                if teachers[key] != "done":
                    finish(TrialResult(index=spec.index, point=spec.point, overrides=spec.overrides, status="failed",
                                       reason=f"teacher failed: {teachers[key]}", pid=-1, host="-", seconds=0.0))
                    continue
                in_flight[trial.submit(spec)] = ("trial", key, spec)
                continue
            if len(parked) >= p.slots:
                break
            point = searcher.propose()
            if point is None:
                break
            spec = p.spec(n, point, deadline)
            n += 1
            key = p.prefix_key(point) if s.reuse_teacher else None
            if key is None or teachers.get(key) == "done":
                in_flight[trial.submit(spec)] = ("trial", key, spec)
            else:
                if key not in teachers:
                    teachers[key] = "pending"
                    tspec = p.spec(spec.index, point, deadline, until=PREFIX_STAGE)
                    in_flight[teacher.submit(tspec)] = ("teacher", key, tspec)
                parked.append((key, spec))
        if not in_flight:
            break
        fut = next(as_completed(list(in_flight)))
        kind, key, spec = in_flight.pop(fut)
        try:
            res = fut.result()
        except Exception as exc:  # the worker itself died: record it, carry on
            res = _failed_from_exception(spec, exc)
        if kind == "teacher":
            teachers[key] = "done" if res.status == "done" else (res.reason or res.status)
            teacher_log.append({"for_trial": spec.index, "status": res.status, "seconds": res.seconds, "ran": res.ran,
                                "reused": res.reused, "reason": res.reason})
            log.info("teacher for trial %d: %s in %.1f s", spec.index, res.status, res.seconds)
        else:
            finish(res)
    for _, spec in parked:  # only left when the time budget ran out
        finish(TrialResult(index=spec.index, point=spec.point, overrides=spec.overrides, status="skipped",
                           reason="budget: the sweep's time budget ran out before this trial started", pid=-1, host="-", seconds=0.0))
    summary = write_results(p, results, time.time() - start)
    summary["teachers"] = teacher_log
    summary["output"] = str(p.out)
    from shrinkflow.io import write_json

    write_json(p.out / "summary.json", summary)
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
    checked: Plan | None = None,
) -> dict[str, Any]:
    """Validate, then run the sweep flow on a Dask cluster built from the sweep's ``cluster`` section.

    ``checked``: the plan of these very arguments when the caller has validated them
    already (the flow itself plans again: it is also an entry point of its own).
    """
    p = checked or plan(sweep_file, root, address=address, workers=workers)  # bad input fails before Prefect starts
    runner = task_runner(p.sweep.cluster.address, p.sweep.cluster.workers)
    with _shared_ephemeral_api():
        return sweep.with_options(task_runner=runner)(
            sweep_file=str(Path(sweep_file).resolve()), root=str(p.root), address=address, workers=workers
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
