"""A sweep's orchestration: plan it, schedule its trials against the Optuna study, write its results.

- ``plan``: read and validate the sweep file against the project before anything runs.
- ``Scheduler``: asks the study for points, keeps at most one trial per worker slot in
  flight (so every proposal knows every finished result and a time budget leaves no queue
  behind), trains each distinct teacher once before the trials that share it, answers a
  point the study already ran from that trial, and tells Optuna every outcome.
- ``write_results``: the results folder, rewritten from the study after every trial, so
  the best passing result so far is on disk whatever happens next.

Where trials run is not decided here: ``flows/sweep.py`` hands the scheduler Prefect's
``submit`` of its tasks (on Dask); tests hand it plain functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.ops.dvcrepo import open_repo
from flows.ops.study import (
    check_study,
    distributions,
    objective_names,
    open_study,
    plot_importances,
    point_of,
    requeue_unfinished,
    results_of,
    storage_url,
    study_ref,
    tell,
    tell_repeat,
)
from schemas.params import Params
from schemas.sweep import GridSearch, RandomSearch, Sweep, TrialResult, TrialSpec
from shrinkflow.config import apply_to_params_file, format_validation_error, load_params, read_yaml
from shrinkflow.errors import InputError, ParamsError
from shrinkflow.io import write_json, write_text
from shrinkflow.search import (
    assess,
    choose,
    csv_text,
    grid_points,
    override_items,
    pareto_front,
    pareto_objectives,
    plot_pareto,
    point_key,
    render_markdown,
    saved_seconds,
    space_size,
    space_values,
    table_rows,
)

#: Params sections the shared prefix (data → train_teacher) depends on, as dvc.yaml lists them.
PREFIX_SECTIONS = ("seed", "device", "data", "train_teacher")
PREFIX_STAGE = "train_teacher"
#: Proposals in a row that repeat a point already run before the search is called converged.
MAX_REPEATS = 50
LOCK_FILE = ".sweep.lock"


# ------------------------------------------------------------------ the sweep file and the plan


def load_sweep(path: Path | str) -> Sweep:
    """Read and validate a sweep file; ParamsError names the key and the fix."""
    data = read_yaml(Path(path), kind="sweep", help="see examples/sweep.yaml and `shrinkflow sweep --schema`")
    try:
        return Sweep.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, data, str(path), kind="sweep")) from None


@dataclass
class Plan:
    """A validated sweep, resolved against a project."""

    sweep: Sweep
    root: Path
    base: Path
    out: Path
    cache_dir: str | None
    fixed: list[str]
    values: dict[str, list[Any]]
    slots: int
    threads: int | None
    latency_key: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> str:
        return storage_url(self.sweep, self.out)

    @property
    def objectives(self) -> list[str]:
        return objective_names(self.sweep, self.latency_key)

    def overrides(self, point: dict[str, Any]) -> list[str]:
        return [*self.fixed, *override_items(point)]

    def params(self, point: dict[str, Any]) -> Params:
        return load_params(self.base, self.overrides(point), root=self.root)

    def prefix_key(self, point: dict[str, Any]) -> str:
        """Trials with the same key share the teacher (same data and train_teacher params)."""
        p = self.params(point).model_dump(mode="json", by_alias=True)
        return json.dumps({k: p[k] for k in PREFIX_SECTIONS}, sort_keys=True)

    def reported_stages(self, point: dict[str, Any]) -> list[str]:
        """Stages whose validation quality bounds the final model's: those on its chain of models."""
        p = self.params(point)
        new_student = p.distill.enabled and p.distill.student != "compressed"
        chain = [] if new_student else [s for s in ("prune", "quantize") if getattr(p, s).enabled]
        return chain + (["distill"] if p.distill.enabled else [])

    def spec(self, index: int, point: dict[str, Any], deadline: float | None, until: str | None = None, study=None) -> TrialSpec:
        s = self.sweep
        return TrialSpec(
            index=index, point=point, overrides=self.overrides(point), project=str(self.root), params_file=str(self.base),
            cache_dir=self.cache_dir, workdir=s.workdir, threads=self.threads, deadline=deadline,
            timeout=s.trial_timeout, keep_workspace=s.keep_workspaces, until=until,
            exclude=[str(self.out), str(self.root / "sweeps")],  # results of this and other sweeps
            study=study,
        )


def dvc_cache_dir(root: Path) -> str:
    """The project's DVC cache folder (``dvc cache dir``)."""
    from dvc.exceptions import NotDvcRepoError

    try:
        with open_repo(root) as repo:
            return str(repo.cache.local_cache_dir)
    except NotDvcRepoError:
        raise InputError(f"{root} is not a DVC project: run `git init && dvc init` there (or pass --root)") from None


def plan(sweep_file: Path | str, root: Path | str = ".", *, address: str | None = None, workers: int | None = None) -> Plan:
    """Validate a sweep against the project at ``root`` before anything runs.

    Every value in the space is checked against the params schema on its own, and
    every grid trial as a whole, so a typo fails here, naming the key.
    """
    sweep = load_sweep(sweep_file)
    if address is not None or workers is not None:
        cl = sweep.cluster.model_copy(update={k: v for k, v in {"address": address, "workers": workers}.items() if v is not None})
        sweep = sweep.model_copy(update={"cluster": cl})
    where = f"{sweep_file}"
    if sweep.early_stop.enabled and sweep.search.mode == "auto" and sweep.search.sampler == "nsga2":
        raise ParamsError(
            f"{where}: early_stop.enabled: Optuna cannot prune the trials of a multi-objective study (search.sampler: "
            "nsga2); set early_stop.enabled: false, or use sampler tpe or gp"
        )
    root = Path(root).resolve()
    base = (root / sweep.params).resolve()
    fixed = override_items(sweep.set)
    try:
        params = load_params(base, fixed, root=root)
    except ParamsError as exc:
        raise ParamsError(f"{where}: `params` + `set` do not make valid params:\n{exc}") from None
    # A data path outside the project must stay reachable from the trial workspaces.
    dpath = Path(params.data.path)
    if not dpath.is_absolute() and not (root / dpath).resolve().is_relative_to(root):
        fixed.append(f"data.path={json.dumps(str((root / dpath).resolve()))}")
    if sweep.objective != "size":
        b = int(sweep.objective.removeprefix("latency_b"))
        if b not in params.evaluate.batch_sizes:
            raise ParamsError(
                f"{where}: objective {sweep.objective!r} needs batch size {b} in evaluate.batch_sizes "
                f"(now {params.evaluate.batch_sizes}); add it with set: {{evaluate.batch_sizes: [1, {b}]}}"
            )
        latency = f"latency_ms_b{b}"
    else:
        latency = f"latency_ms_b{min(params.evaluate.batch_sizes)}" if params.evaluate.batch_sizes else None
    values = space_values(sweep.space)
    for key, vals in values.items():
        for v in vals:
            try:
                load_params(base, [*fixed, *override_items({key: v})], root=root)
            except ParamsError as exc:
                raise ParamsError(f"{where}: space.{key}: value {v!r} is not valid:\n{exc}") from None
    if isinstance(sweep.search, GridSearch):
        for p in grid_points(values)[: sweep.budget.trials]:
            try:
                load_params(base, [*fixed, *override_items(p)], root=root)
            except ParamsError as exc:
                raise ParamsError(f"{where}: the trial {p} is not valid:\n{exc}") from None
    cluster = sweep.cluster
    slots = _scheduler_threads(cluster.address) if cluster.address else cluster.workers
    threads = cluster.threads_per_trial or (None if cluster.address else max(1, (os.cpu_count() or 1) // cluster.workers))
    out = root / (sweep.output or f"sweeps/{sweep.name}")
    cache = dvc_cache_dir(root) if sweep.reuse_teacher else None
    return Plan(sweep=sweep, root=root, base=base, out=out, cache_dir=cache, fixed=fixed, values=values, slots=slots,
                threads=threads, latency_key=latency)


def _scheduler_threads(address: str) -> int:
    from distributed import Client

    try:
        with Client(address, timeout=10) as client:
            return max(1, sum(client.nthreads().values()))
    except OSError as exc:
        raise InputError(f"cluster.address {address!r}: cannot reach the Dask scheduler ({exc})") from None


def wait_for_workers(address: str, n: int, timeout: float = 120.0) -> None:
    """Block until the Dask scheduler at ``address`` has ``n`` workers; InputError after ``timeout`` s."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info()["workers"]) >= n:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise InputError(f"cluster.address {address!r}: fewer than {n} Dask workers after {timeout:g} s")
        time.sleep(1)


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold the results folder: a second sweep on it (or a --resume while this one lives) fails at once.

    The kernel drops the lock when its process dies, even by SIGKILL, so a killed sweep
    can always be resumed.
    """
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"{out} is in use by a running sweep ({f.read().strip() or 'pid unknown'}): wait for it, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def preflight(p: Plan, resume: bool) -> None:
    """Fail before any start-up cost when the sweep cannot start as asked (study exists without --resume, in use...)."""
    with sweep_lock(p.out):
        check_study(p.sweep, p.out, p.objectives, resume)


# ------------------------------------------------------------------ scheduling


Submit = Callable[[TrialSpec], Any]


@dataclass
class Scheduler:
    """Runs a planned sweep against its study, handing each trial to ``submit_trial`` / ``submit_teacher``.

    ``first_done(futures)`` returns one finished future of those given; a future's
    ``result()`` is the TrialResult (an exception there is a worker that died).
    """

    plan: Plan
    submit_trial: Submit
    submit_teacher: Submit
    first_done: Callable[[list[Any]], Any]
    log: Callable[[str], None] = print
    resume: bool = False

    def run(self) -> dict[str, Any]:
        p, s = self.plan, self.plan.sweep
        study, notes = open_study(s, p.out, p.slots, p.objectives, self.resume)
        for n in notes:
            self.log(n)
        if self.resume:
            queued = requeue_unfinished(study)
            if queued:
                self.log(f"--resume: trials {queued} never finished; their points run again")
        start = time.time()
        spent = float(study.user_attrs.get("seconds", 0.0))
        deadline = start + s.budget.seconds - spent if s.budget.seconds else None
        dists = distributions(s)
        results = results_of(study)
        finished = {point_key(r.point): r.index for r in results if _finished(r)}
        started = len(finished)
        size = space_size(s.space, s.search.mode)
        budget = s.budget.trials if not isinstance(s.search, RandomSearch) else min(s.budget.trials or s.search.trials, s.search.trials)
        teachers: dict[str, str] = {}  # prefix key -> "pending" | "done" | failure reason
        teacher_log: list[dict[str, Any]] = []
        parked: list[tuple[str, Any, TrialSpec]] = []  # trials waiting for their teacher
        in_flight: dict[Any, tuple[str, str | None, Any, TrialSpec]] = {}  # future -> (kind, prefix key, trial, spec)
        running: dict[str, int] = {}  # point key -> trial number of the trial running it
        twins: dict[str, list[Any]] = {}  # point key -> asked trials repeating a running point
        repeats = 0
        stop_note: str | None = None

        def elapsed() -> float:
            return spent + time.time() - start

        def finish(trial: Any, res: TrialResult) -> None:
            tell(study, trial, res, s, p.objectives)
            results.append(res)
            key = point_key(res.point)
            running.pop(key, None)
            if _finished(res):
                finished[key] = res.index
            for twin in twins.pop(key, []):
                tell_repeat(study, twin, study.get_trials(deepcopy=False)[res.index])
            study.set_user_attr("seconds", round(elapsed(), 2))
            self.log(f"trial {res.index} {res.point} {res.status}{f': {res.reason}' if res.reason else ''}")
            self.write(study, results, elapsed(), final=False)

        while True:
            while len(in_flight) < p.slots and not (deadline and time.time() >= deadline):
                ready = next((x for x in parked if teachers.get(x[0]) != "pending"), None)
                if ready is not None:
                    parked.remove(ready)
                    key, trial, spec = ready
                    if teachers[key] != "done":
                        finish(trial, TrialResult(index=spec.index, point=spec.point, overrides=spec.overrides, status="failed",
                                                  reason=f"teacher failed: {teachers[key]}", pid=-1, host="-", seconds=0.0))
                        continue
                    in_flight[self.submit_trial(spec)] = ("trial", key, trial, spec)
                    continue
                if len(parked) >= p.slots:
                    break
                if budget is not None and started >= budget:
                    break
                if size is not None and len(set(finished) | set(running)) >= size:
                    break
                if repeats >= MAX_REPEATS:
                    stop_note = f"The sampler proposed {repeats} points in a row that were already run: the search converged."
                    break
                trial = study.ask(fixed_distributions=dists)
                point = point_of(trial.params, s)
                pk = point_key(point)
                if pk in finished:  # asked again for a point the study ran: its outcome, not a rerun
                    tell_repeat(study, trial, study.get_trials(deepcopy=False)[finished[pk]])
                    repeats += 1
                    continue
                if pk in running:
                    twins.setdefault(pk, []).append(trial)
                    repeats += 1
                    continue
                repeats = 0
                started += 1
                running[pk] = trial.number
                trial.set_user_attr("point", point)
                ref = study_ref(study, trial, p.storage, s, p.reported_stages(point))
                spec = p.spec(trial.number, point, deadline, study=ref)
                key = p.prefix_key(point) if s.reuse_teacher else None
                if key is None or teachers.get(key) == "done":
                    in_flight[self.submit_trial(spec)] = ("trial", key, trial, spec)
                else:
                    if key not in teachers:
                        teachers[key] = "pending"
                        tspec = p.spec(trial.number, point, deadline, until=PREFIX_STAGE)
                        in_flight[self.submit_teacher(tspec)] = ("teacher", key, None, tspec)
                    parked.append((key, trial, spec))
            if not in_flight:
                break
            fut = self.first_done(list(in_flight))
            kind, key, trial, spec = in_flight.pop(fut)
            try:
                res = fut.result()
            except Exception as exc:  # the worker itself died: record it, carry on
                res = TrialResult(index=spec.index, point=spec.point, overrides=spec.overrides, status="failed",
                                  reason=f"worker: {type(exc).__name__}: {exc}", pid=-1, host="?", seconds=0.0)
            if kind == "teacher":
                teachers[key] = "done" if res.status == "done" else (res.reason or res.status)
                teacher_log.append({"for_trial": spec.index, "status": res.status, "seconds": res.seconds, "ran": res.ran,
                                    "reused": res.reused, "reason": res.reason})
                self.log(f"teacher for trial {spec.index}: {res.status} in {res.seconds:.1f} s")
            else:
                finish(trial, res)
        for _, trial, spec in parked:  # only left when the time budget ran out
            finish(trial, TrialResult(index=spec.index, point=spec.point, overrides=spec.overrides, status="skipped",
                                      reason="budget: the sweep's time budget ran out before this trial started", pid=-1,
                                      host="-", seconds=0.0))
        notes = [stop_note] if stop_note else []
        summary = self.write(study, results, elapsed(), notes=notes)
        summary["teachers"] = teacher_log
        summary["output"] = str(p.out)
        write_json(p.out / "summary.json", summary)
        return summary

    def write(self, study: Any, results: list[TrialResult], elapsed: float, *, final: bool = True, notes: list[str] = ()) -> dict:
        return write_results(self.plan, results, elapsed, study=study, final=final, notes=notes)


def _finished(r: TrialResult) -> bool:
    """A trial that counts as run: done, pruned or failed on its own (not cut by the budget, not interrupted)."""
    return r.status in ("done", "pruned") or (r.status == "failed" and not (r.reason or "").startswith("budget"))


# ------------------------------------------------------------------ results


def write_results(
    plan: Plan, results: list[TrialResult], elapsed: float, *, study: Any = None, final: bool = True, notes: list[str] = ()
) -> dict[str, Any]:
    """Write the results folder; returns the summary (also written as summary.json).

    Called after every finished trial (``final=False`` skips the PNGs), so the best
    passing result so far is on disk even if the sweep is interrupted.
    """
    out, s = plan.out, plan.sweep
    out.mkdir(parents=True, exist_ok=True)
    # Re-estimated each time from every finished trial so far (the first pruned trial may predate them).
    results = [r.model_copy(update={"saved_seconds": saved_seconds(r, results)}) if r.status == "pruned" else r for r in results]
    rows = table_rows(results, s)
    objectives = pareto_objectives([r for r in rows if r["status"] == "done"], s)
    front = pareto_front(rows, objectives)
    chosen = choose(results, s)
    pruned = [r for r in results if r.status == "pruned"]
    saved = round(sum(r.saved_seconds or 0.0 for r in pruned), 2)
    dashboard = f"optuna-dashboard {plan.storage}"
    notes = [*notes, f"Study: `{plan.sweep.study.name or s.name}` in `{plan.storage}`; browse it with `{dashboard}`."]
    write_text(out / "results.csv", csv_text(rows))
    write_text(out / "results.md", render_markdown(rows, s, chosen, front, elapsed, notes))
    for r in results:
        if r.status == "done" and r.report:
            write_text(out / "trials" / f"{r.index:03d}" / "report.md", r.report)
    on_front = {rows[i]["trial"] for i in front}
    write_json(
        out / "pareto.json",
        [
            {"trial": r["trial"], **{k: r[k] for k in objectives}, "pareto": r["trial"] in on_front, "passed": bool(r["passed"])}
            for r in rows if r["status"] == "done"
        ],
    )
    q = next(iter(objectives))
    write_text(
        out / "dvc.yaml",
        "# Written by `shrinkflow sweep`: lets `dvc plots show` render this sweep's frontier.\n"
        + yaml.safe_dump({"plots": [{"pareto.json": {"template": "scatter", "x": "size_bytes", "y": q,
                                                     "title": f"sweep {s.name}: {q} vs size"}}]}, sort_keys=False),
    )
    best = out / "best-params.yaml"
    if chosen is not None:
        # Validated like any params file; written inside the project root first because the
        # params' relative paths (data.path, checkpoint) are relative to it.
        tmp = plan.root / f".sweep-best-{os.getpid()}.yaml"
        try:
            apply_to_params_file(tmp, plan.base, chosen.overrides)
            text = tmp.read_text(encoding="utf-8")
        finally:
            tmp.unlink(missing_ok=True)
        header = (
            f"# Chosen by sweep {s.name!r}: trial {chosen.index} {json.dumps(chosen.point)}\n"
            f"# {chosen.metrics.quality_key} {chosen.metrics.quality:.4g}, "
            f"{s.objective} {assess(chosen, s)['objective_value']:.4g}. Use: shrinkflow run -p {_shown(best, plan.root)}\n"
        )
        write_text(best, header + text)
    else:
        best.unlink(missing_ok=True)
    count = {k: sum(r["status"] == k for r in rows) for k in ("done", "pruned", "failed", "skipped", "interrupted")}
    summary = {
        "name": s.name,
        "mode": s.search.mode,
        "sampler": s.search.sampler if s.search.mode == "auto" else s.search.mode,
        "trials": len(rows),
        **count,
        "saved_seconds": saved,
        "seconds": round(elapsed, 2),
        "objective": s.objective,
        "criterion": s.criterion.model_dump(),
        "pareto": sorted(on_front),
        "chosen": None if chosen is None else {"trial": chosen.index, "point": chosen.point, **assess(chosen, s)},
        "best_params": _shown(best, plan.root) if chosen is not None else None,
        "study": {"storage": plan.storage, "name": s.study.name or s.name, "dashboard": dashboard},
    }
    write_json(out / "summary.json", summary)
    if final:
        plot_pareto(out / "pareto.png", rows, front, objectives, None if chosen is None else chosen.index)
        if study is not None:
            why = plot_importances(study, out / "importances.png", plan.objectives[0])
            summary["importances"] = why or "importances.png"
            write_json(out / "summary.json", summary)
    return summary


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the project root when it lies inside it, else absolute."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


