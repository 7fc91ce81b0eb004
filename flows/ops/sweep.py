"""Sweeps: many params variations, each run as the full chain in its own workspace.

This module is the library half (no Prefect): reading and planning a sweep file,
expanding grid / random points, the ``auto`` search, running one trial in an isolated
workspace that shares the project's DVC cache, the Pareto frontier, and the results
(CSV, markdown, DVC plots data, PNG, the chosen params file). ``flows/sweep.py`` wires
these into a Prefect flow whose tasks run on Dask.

A trial never shares a workspace: it copies the project's source files (what git
tracks or would track) into a fresh folder whose ``.dvc/config.local`` points
``cache.dir`` at the project's cache, writes its params there, and runs ``dvc repro``
in a subprocess. Stages whose inputs a previous trial (or the project itself) already
ran are restored from DVC's run-cache instead of being run again.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from flows.ops.dvcrepo import open_repo
from flows.ops.serve import prefect_env, stop
from schemas.metrics import Metrics, VariantMetrics
from schemas.outputs import read_manifest
from schemas.params import Params
from schemas.paths import VARIANTS, StagePaths
from schemas.sweep import AutoSearch, Criterion, GridSearch, RandomSearch, Range, Sweep
from shrinkflow.config import PARAMS_FILE, apply_to_params_file, format_validation_error, load_params, read_yaml
from shrinkflow.errors import InputError, ParamsError
from shrinkflow.io import write_json, write_text
from shrinkflow.report import quality_drop

#: Params sections the shared prefix (data → train_teacher) depends on, as dvc.yaml lists them.
PREFIX_SECTIONS = ("seed", "device", "data", "train_teacher")
PREFIX_STAGE = "train_teacher"
#: Files and folders never copied into a trial workspace.
_SKIP = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


# ------------------------------------------------------------------ sweep file


def load_sweep(path: Path | str) -> Sweep:
    """Read and validate a sweep file; ParamsError names the key and the fix."""
    data = read_yaml(Path(path), kind="sweep", help="see examples/sweep.yaml and `shrinkflow sweep --schema`")
    try:
        return Sweep.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, data, str(path), kind="sweep")) from None


def override_items(mapping: dict[str, Any]) -> list[str]:
    """``{"prune.sparsity": 0.9}`` → ``["prune.sparsity=0.9"]`` (JSON is valid YAML, so lists/dicts survive)."""
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def space_values(space: dict[str, list[Any] | Range]) -> dict[str, list[Any]]:
    """Each key's discrete values: lists as written, ranges cut into ``steps`` values."""
    return {k: (v.values() if isinstance(v, Range) else list(v)) for k, v in space.items()}


def grid_points(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, first key varying slowest."""
    keys = list(values)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values[k] for k in keys))]


def _draw(spec: list[Any] | Range, rng: random.Random) -> Any:
    if not isinstance(spec, Range):
        return rng.choice(spec)
    if spec.log:
        v = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
    else:
        v = rng.uniform(spec.low, spec.high)
    return int(round(v)) if spec.integer else float(f"{v:.6g}")


def random_points(space: dict[str, list[Any] | Range], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct random points (fewer when the space has fewer)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(n * 50):
        if len(out) == n:
            break
        p = {k: _draw(v, rng) for k, v in space.items()}
        if point_key(p) not in seen:
            seen.add(point_key(p))
            out.append(p)
    return out


# ------------------------------------------------------------------ criterion / objective


def objective_column(objective: str) -> str:
    """metrics.json key a sweep objective minimises."""
    return "size_bytes" if objective == "size" else objective.replace("latency_b", "latency_ms_b")


# ------------------------------------------------------------------ trials


class TrialSpec(BaseModel):
    """Everything a worker needs to run one trial (paths must exist on the worker)."""

    model_config = ConfigDict(frozen=True)

    index: int
    point: dict[str, Any]
    overrides: list[str]
    project: str
    params_file: str
    cache_dir: str | None
    workdir: str | None = None
    threads: int | None = None
    deadline: float | None = None
    timeout: float | None = None
    keep_workspace: bool = False
    until: str | None = None
    exclude: list[str] = []


class TrialResult(BaseModel):
    """What one trial did: its metrics, or why it failed."""

    index: int
    point: dict[str, Any]
    overrides: list[str] = []
    status: Literal["done", "failed", "skipped"]
    reason: str | None = None
    pid: int
    host: str
    seconds: float
    ran: list[str] = []
    reused: list[str] = []
    final_variant: str | None = None
    metrics: VariantMetrics | None = None
    teacher: VariantMetrics | None = None
    report: str | None = None
    workspace: str | None = None


def project_files(root: Path, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Source files of the project, relative to ``root``: what git tracks or would track.

    Without git, everything except caches and virtualenvs (slower for projects holding
    large untracked outputs). ``exclude``: folders (relative to ``root``, or absolute) left out.
    """
    root = Path(root)
    excl = [(root / e).resolve() for e in exclude]
    if (root / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True, check=True
        ).stdout.decode()
        files = [Path(p) for p in out.split("\0") if p]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            dirnames[:] = [
                d for d in dirnames
                if d not in _SKIP and not (rel == Path(".dvc") and d in ("cache", "tmp"))
                and (Path(dirpath) / d).resolve() not in excl
            ]
            files += [rel / f for f in filenames]
    return [
        f for f in files
        if (root / f).is_file() and not any(p in _SKIP for p in f.parts)
        and not any((root / f).resolve().is_relative_to(e) for e in excl)
    ]


def make_workspace(project: Path, dest: Path, cache_dir: str | None, exclude: Sequence[str] = ()) -> Path:
    """Copy the project's sources into ``dest`` and point its DVC cache at ``cache_dir``.

    ``cache_dir`` None: a private cache (nothing reused) and no dvc.lock.
    ``exclude``: folders not copied (the sweep's own results folder).
    """
    from configobj import ConfigObj  # DVC's own config format and parser

    project = Path(project)
    for rel in project_files(project, exclude=[dest, *exclude]):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, target)
    (dest / ".dvc").mkdir(exist_ok=True)
    local = project / ".dvc" / "config.local"  # git-ignored (may hold remote credentials): copy it too
    if local.is_file():
        shutil.copy2(local, dest / ".dvc" / "config.local")
    conf = ConfigObj(str(dest / ".dvc" / "config.local"))
    conf.setdefault("core", {})["no_scm"] = "true"  # the workspace is not a git repo
    if cache_dir:
        conf.setdefault("cache", {})["dir"] = str(cache_dir)
    else:
        (dest / "dvc.lock").unlink(missing_ok=True)
    conf.write()
    return dest


def _stage_lines(output: str) -> tuple[list[str], list[str]]:
    ran, reused = [], []
    for line in output.splitlines():
        m = re.match(r"^Running stage '([^']+)'", line)
        if m:
            ran.append(m.group(1))
        m = re.match(r"^Stage '([^']+)' (is cached|didn't change)", line)
        if m:
            reused.append(m.group(1))
    return ran, reused


def failure_reason(output: str) -> str:
    """The most useful line of a failed ``dvc repro``: the stage's own error, else its last traceback line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    stage = next((m.group(1) for ln in lines if (m := re.search(r"failed to reproduce '([^']+)'", ln))), None)
    err = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")), None)
    if err is None:
        tb = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Diverged)\b.*:", ln)]
        err = tb[-1] if tb else next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
    return f"{stage}: {err}" if stage else err


def _env(ws: Path, threads: int | None) -> dict[str, str]:
    env = prefect_env(None)  # the venv first on PATH, analytics off
    # Stage commands import the workspace's copy of the code, the one DVC hashed.
    env["PYTHONPATH"] = str(ws) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout kill the group (DVC and the stage it runs)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        stop(proc, grace=10)  # SIGTERM to the group, SIGKILL after the grace
        out, _ = proc.communicate()
        return None, out or ""


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial in a fresh workspace; never raises (failures are results).

    ``spec.until``: reproduce only up to this stage (used to train a shared teacher once).
    """
    start = time.time()
    base = dict(index=spec.index, point=spec.point, overrides=spec.overrides, pid=os.getpid(), host=socket.gethostname())

    def result(status: str, **kw: Any) -> TrialResult:
        return TrialResult(status=status, seconds=round(time.time() - start, 3), **base, **kw)

    timeout, why = spec.timeout, f"timeout: stopped after trial_timeout={spec.timeout:g} s" if spec.timeout else ""
    if spec.deadline is not None:
        left = spec.deadline - time.time()
        if left <= 0:
            return result("skipped", reason="budget: the sweep's time budget ran out before this trial started")
        if timeout is None or left < timeout:
            timeout, why = left, "budget: stopped when the sweep's time budget ran out"
    ws = Path(tempfile.mkdtemp(prefix=f"shrinkflow-trial{spec.index:03d}-", dir=spec.workdir))
    keep = spec.keep_workspace
    try:
        make_workspace(Path(spec.project), ws, spec.cache_dir, spec.exclude)
        try:
            apply_to_params_file(ws / PARAMS_FILE, Path(spec.params_file), spec.overrides)
        except (ParamsError, InputError) as exc:
            return result("failed", reason=f"params: {exc}")
        env = _env(ws, spec.threads)
        dvc = [sys.executable, "-m", "dvc"]
        dvcfiles = [str(p.relative_to(ws)) for p in ws.rglob("*.dvc") if p.is_file()]
        if dvcfiles:  # data tracked with `dvc add`: check it out from the shared cache
            code, out = _run([*dvc, "checkout", *dvcfiles], ws, env, timeout)
            if code != 0:
                return result("failed", reason=f"dvc checkout: {failure_reason(out)}")
        cmd = [*dvc, "repro", *([spec.until] if spec.until else [])]
        code, out = _run(cmd, ws, env, None if timeout is None else max(timeout - (time.time() - start), 1.0))
        ran, reused = _stage_lines(out)
        if code is None:
            return result("failed", reason=why, ran=ran, reused=reused)
        if code != 0:
            return result("failed", reason=failure_reason(out), ran=ran, reused=reused)
        if spec.until:
            return result("done", ran=ran, reused=reused)
        paths = StagePaths(ws)
        metrics = Metrics.read(ws)
        final = read_manifest("evaluate", ws).final_variant
        row, teacher = metrics[final], metrics[VARIANTS["train_teacher"]]
        if not all(math.isfinite(m.quality) for m in (row, teacher)):
            return result("failed", reason=f"diverged: {row.quality_key} is not finite", ran=ran, reused=reused)
        report = paths.report.read_text() if paths.report.is_file() else None
        return result(
            "done", ran=ran, reused=reused, final_variant=final, metrics=row, teacher=teacher, report=report,
            workspace=str(ws) if keep else None,
        )
    except Exception as exc:  # a crashed trial is a result, never the end of the sweep
        return result("failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        if not keep:
            shutil.rmtree(ws, ignore_errors=True)


# ------------------------------------------------------------------ planning


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
    points: list[dict[str, Any]] | None  # None: chosen on the fly (auto)
    slots: int
    threads: int | None
    meta: dict[str, Any] = field(default_factory=dict)

    def overrides(self, point: dict[str, Any]) -> list[str]:
        return [*self.fixed, *override_items(point)]

    def params(self, point: dict[str, Any]) -> Params:
        return load_params(self.base, self.overrides(point), root=self.root)

    def prefix_key(self, point: dict[str, Any]) -> str:
        """Trials with the same key share the teacher (same data and train_teacher params)."""
        p = self.params(point).model_dump(mode="json", by_alias=True)
        return json.dumps({k: p[k] for k in PREFIX_SECTIONS}, sort_keys=True)

    def spec(self, index: int, point: dict[str, Any], deadline: float | None, until: str | None = None) -> TrialSpec:
        s = self.sweep
        return TrialSpec(
            index=index, point=point, overrides=self.overrides(point), project=str(self.root), params_file=str(self.base),
            cache_dir=self.cache_dir, workdir=s.workdir, threads=self.threads, deadline=deadline,
            timeout=s.trial_timeout, keep_workspace=s.keep_workspaces, until=until,
            exclude=[str(self.out), str(self.root / "sweeps")],  # results of this and other sweeps
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
    every grid / random trial as a whole, so a typo fails here, naming the key.
    """
    sweep = load_sweep(sweep_file)
    if address is not None or workers is not None:
        cl = sweep.cluster.model_copy(update={k: v for k, v in {"address": address, "workers": workers}.items() if v is not None})
        sweep = sweep.model_copy(update={"cluster": cl})
    root = Path(root).resolve()
    base = (root / sweep.params).resolve()
    fixed = override_items(sweep.set)
    where = f"{sweep_file}"
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
    values = space_values(sweep.space)
    for key, vals in values.items():
        for v in vals:
            try:
                load_params(base, [*fixed, *override_items({key: v})], root=root)
            except ParamsError as exc:
                raise ParamsError(f"{where}: space.{key}: value {v!r} is not valid:\n{exc}") from None
    search = sweep.search
    if isinstance(search, GridSearch):
        points = grid_points(values)
    elif isinstance(search, RandomSearch):
        points = random_points(sweep.space, search.trials, search.seed)
    else:
        points = None
    if points is not None and sweep.budget.trials:
        points = points[: sweep.budget.trials]
    for p in points or []:
        try:
            load_params(base, [*fixed, *override_items(p)], root=root)
        except ParamsError as exc:
            raise ParamsError(f"{where}: the trial {p} is not valid:\n{exc}") from None
    cluster = sweep.cluster
    slots = _scheduler_threads(cluster.address) if cluster.address else cluster.workers
    threads = cluster.threads_per_trial or (None if cluster.address else max(1, (os.cpu_count() or 1) // cluster.workers))
    out = root / (sweep.output or f"sweeps/{sweep.name}")
    cache = dvc_cache_dir(root) if sweep.reuse_teacher else None
    return Plan(sweep=sweep, root=root, base=base, out=out, cache_dir=cache, fixed=fixed, values=values, points=points, slots=slots, threads=threads)


def _scheduler_threads(address: str) -> int:
    from distributed import Client

    try:
        with Client(address, timeout=10) as client:
            return max(1, sum(client.nthreads().values()))
    except OSError as exc:
        raise InputError(f"cluster.address {address!r}: cannot reach the Dask scheduler ({exc})") from None


# ------------------------------------------------------------------ search


class Searcher:
    """Proposes the next point; ``observe`` feeds results back (auto mode uses them)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        s = plan.sweep
        self.budget = s.budget.trials
        self.proposed: list[dict[str, Any]] = []
        self.tried: set[str] = set()
        self.results: list[TrialResult] = []
        self._static = list(plan.points) if plan.points is not None else None
        auto = s.search if isinstance(s.search, AutoSearch) else None
        self.rng = random.Random(auto.seed if auto else 0)
        self.initial = (auto.initial if auto and auto.initial else max(2, plan.slots)) if auto else 0
        self.explore = auto.explore if auto else 0.0
        self.keys = list(plan.values)
        self.total = math.prod(len(v) for v in plan.values.values())

    def propose(self) -> dict[str, Any] | None:
        if self.budget is not None and len(self.proposed) >= self.budget:
            return None
        if self._static is not None:
            p = self._static.pop(0) if self._static else None
        else:
            p = self._auto()
        if p is not None:
            self.proposed.append(p)
            self.tried.add(point_key(p))
        return p

    def observe(self, result: TrialResult) -> None:
        self.results.append(result)

    # auto ---------------------------------------------------------------
    def _random_untried(self) -> dict[str, Any] | None:
        if len(self.tried) >= self.total:
            return None
        for _ in range(200):
            p = {k: self.rng.choice(self.plan.values[k]) for k in self.keys}
            if point_key(p) not in self.tried:
                return p
        for combo in itertools.product(*(self.plan.values[k] for k in self.keys)):  # nearly exhausted: scan
            p = dict(zip(self.keys, combo, strict=True))
            if point_key(p) not in self.tried:
                return p
        return None

    def _neighbours(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for k in self.keys:
            vals = self.plan.values[k]
            i = next((j for j, v in enumerate(vals) if v == p[k]), None)
            if i is None:
                continue
            for j in (i - 1, i + 1):
                if 0 <= j < len(vals):
                    q = {**p, k: vals[j]}
                    if point_key(q) not in self.tried:
                        out.append(q)
        return out

    def _auto(self) -> dict[str, Any] | None:
        if len(self.proposed) < self.initial or self.rng.random() < self.explore:
            return self._random_untried()
        rows = [assess(r, self.plan.sweep) for r in self.results if r.status == "done"]
        passing = sorted((r for r in rows if r["passed"]), key=lambda r: r["objective_value"])
        # Around the best passing configs first; with none passing yet, around the closest misses.
        refs = passing or sorted(rows, key=lambda r: r["drop"])
        trend = self._trends(rows) if passing else {}
        for ref in refs:
            nb = self._neighbours(ref["point"])
            if nb:
                # Prefer steps that the finished trials say lower the objective (e.g. more sparsity → smaller).
                downhill = [q for q in nb if self._predicted_gain(ref["point"], q, trend) > 0]
                return self.rng.choice(downhill or nb)
        return self._random_untried()

    def _trends(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Per key: the sign of how the objective moved with the value's position (−1, 0, +1).

        From pairs of finished trials that differ in that key only; no pair, no trend.
        """
        out: dict[str, float] = {}
        for k in self.keys:
            vals, votes = self.plan.values[k], 0
            for a, b in itertools.combinations(rows, 2):
                pa, pb = a["point"], b["point"]
                if pa[k] == pb[k] or any(pa[o] != pb[o] for o in self.keys if o != k):
                    continue
                try:
                    step = vals.index(pb[k]) - vals.index(pa[k])
                except ValueError:
                    continue
                votes += int(math.copysign(1, step)) * (1 if b["objective_value"] > a["objective_value"] else -1 if b["objective_value"] < a["objective_value"] else 0)
            out[k] = float((votes > 0) - (votes < 0))
        return out

    def _predicted_gain(self, ref: dict[str, Any], q: dict[str, Any], trend: dict[str, float]) -> float:
        k = next(k for k in self.keys if ref[k] != q[k])
        vals = self.plan.values[k]
        return -trend.get(k, 0.0) * (vals.index(q[k]) - vals.index(ref[k]))


# ------------------------------------------------------------------ results


def assess(result: TrialResult, sweep: Sweep) -> dict[str, Any]:
    """A trial's standing: quality drop vs its teacher, criterion met, objective value."""
    out: dict[str, Any] = {"point": result.point, "passed": False, "drop": math.inf, "objective_value": math.inf}
    if result.status != "done":
        return out
    m, t = result.metrics, result.teacher
    crit: Criterion = sweep.criterion
    drop = quality_drop(t.quality, m.quality, m.quality_key, crit.relative)
    out.update(drop=drop, passed=drop <= crit.max_drop, objective_value=float(m.get(objective_column(sweep.objective))))
    return out


def pareto_front(rows: Sequence[dict[str, Any]], objectives: dict[str, Literal["max", "min"]]) -> list[int]:
    """Indices of the rows no other row dominates (at least as good everywhere, better somewhere).

    Rows missing an objective or holding a non-finite value are never on the front.
    Identical rows do not dominate each other, so all copies stay.
    """
    sign = {k: (1.0 if d == "min" else -1.0) for k, d in objectives.items()}

    def vec(r: dict[str, Any]) -> list[float] | None:
        try:
            v = [sign[k] * float(r[k]) for k in objectives]
        except (KeyError, TypeError, ValueError):
            return None
        return v if all(math.isfinite(x) for x in v) else None

    vecs = [vec(r) for r in rows]
    front = []
    for i, a in enumerate(vecs):
        if a is None:
            continue
        dominated = any(
            b is not None and all(y <= x for x, y in zip(a, b, strict=True)) and any(y < x for x, y in zip(a, b, strict=True))
            for j, b in enumerate(vecs) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pareto_objectives(rows: Iterable[dict[str, Any]], sweep: Sweep) -> dict[str, Literal["max", "min"]]:
    """Quality (max accuracy / min MSE), file size and latency (the objective's batch size, else the smallest)."""
    rows = list(rows)
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    q = "accuracy" if "accuracy" in keys else "mse"
    lat = objective_column(sweep.objective) if sweep.objective != "size" else None
    if lat is None:
        lats = sorted((k for k in keys if k.startswith("latency_ms_b")), key=lambda k: int(k.removeprefix("latency_ms_b")))
        lat = lats[0] if lats else None
    objs: dict[str, Literal["max", "min"]] = {q: "max" if q == "accuracy" else "min", "size_bytes": "min"}
    if lat:
        objs[lat] = "min"
    return objs


def table_rows(results: Sequence[TrialResult], sweep: Sweep) -> list[dict[str, Any]]:
    """One flat row per trial: the point, status, the final model's metrics.json keys, drop, pass."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        a = assess(r, sweep)
        row: dict[str, Any] = {"trial": r.index, "status": r.status}
        # Lists and mappings (e.g. a student model spec) as JSON, so the CSV cell reads back.
        row.update({k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v) for k, v in r.point.items()})
        if r.metrics is not None:
            row.update(r.metrics.model_dump(exclude_none=True))
        if r.teacher is not None:
            row[f"teacher_{r.teacher.quality_key}"] = r.teacher.quality
        row.update(
            drop=a["drop"] if r.status == "done" else None,
            passed=a["passed"] if r.status == "done" else None,
            seconds=r.seconds, pid=r.pid, host=r.host, ran=" ".join(r.ran), reused=" ".join(r.reused), reason=r.reason or "",
        )
        rows.append(row)
    return rows


def choose(results: Sequence[TrialResult], sweep: Sweep) -> TrialResult | None:
    """The passing trial with the smallest objective (ties: higher quality, then lower index)."""
    best, best_key = None, None
    for r in results:
        a = assess(r, sweep)
        if not a["passed"]:
            continue
        key = (a["objective_value"], a["drop"], r.index)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(rows: list[dict[str, Any]], plan: Plan, chosen: TrialResult | None, front: list[int], elapsed: float) -> str:
    s = plan.sweep
    q = "accuracy" if any("accuracy" in r for r in rows) else "mse"
    lat = [c for c in pareto_objectives(rows, s) if c.startswith("latency_ms_b")]
    cols = ["trial", "status", *plan.values, q, f"teacher_{q}", "drop", "passed", "size_bytes", "compression_ratio", *lat, "seconds"]
    on_front = {rows[i]["trial"] for i in front}
    lines = [
        f"# Sweep `{s.name}`",
        "",
        f"Mode: {s.search.mode}; criterion: {q} drop ≤ {s.criterion.max_drop:g}"
        f"{' (relative)' if s.criterion.relative else ''} vs the trial's teacher; objective: minimise {s.objective}. "
        f"{len(rows)} trials in {elapsed:.0f} s ({sum(r['status'] == 'done' for r in rows)} done, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed, {sum(r['status'] == 'skipped' for r in rows)} skipped). "
        "★ = on the Pareto frontier (quality vs size vs latency).",
        "",
        "| " + " | ".join(cols) + " |",
        "|---" * len(cols) + "|",
    ]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols]
        if r["trial"] in on_front:
            cells[0] += " ★"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if chosen is not None:
        lines += [f"**Chosen: trial {chosen.index}** {json.dumps(chosen.point)} → `best-params.yaml`", ""]
    else:
        lines += ["**No trial met the criterion**: nothing chosen (loosen `criterion.max_drop` or widen the space).", ""]
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["## Failed / skipped", ""] + [f"- trial {r['trial']}: {r['reason']}" for r in failed] + [""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    write_text(path, buf.getvalue())


def plot_pareto(path: Path, rows: list[dict[str, Any]], front: list[int], objectives: dict[str, str], chosen_trial: int | None) -> None:
    """Quality vs size and quality vs latency: every trial, the Pareto set, each panel's 2-D frontier, the chosen one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, *xs = list(objectives)
    fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4.2), squeeze=False)
    done = [i for i, r in enumerate(rows) if r["status"] == "done"]
    for ax, x in zip(axes[0], xs, strict=True):
        ax.scatter([rows[i][x] for i in done], [rows[i][q] for i in done], c="0.6", label="trials")
        ax.scatter([rows[i][x] for i in front], [rows[i][q] for i in front], c="tab:red", label="Pareto set (all objectives)")
        # The frontier of this panel's two objectives alone, as a staircase.
        pair = pareto_front([rows[i] for i in done], {q: objectives[q], x: "min"})
        pts = sorted((rows[done[j]][x], rows[done[j]][q]) for j in pair)
        if len(pts) > 1:
            ax.step(*zip(*pts, strict=True), where="post", ls="--", c="tab:red", alpha=0.6, label=f"frontier ({q} vs {x})")
        for i in done:
            ax.annotate(str(rows[i]["trial"]), (rows[i][x], rows[i][q]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if chosen_trial is not None:
            c = next(r for r in rows if r["trial"] == chosen_trial)
            ax.scatter([c[x]], [c[q]], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="chosen")
        xv = [float(rows[i][x]) for i in done]
        if xv and min(xv) > 0 and max(xv) / min(xv) > 20:  # sizes can span orders of magnitude
            ax.set_xscale("log")
        ax.set_xlabel(x + (" (bytes)" if x == "size_bytes" else " (ms)"))
        ax.set_ylabel(q)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(plan: Plan, results: Sequence[TrialResult], elapsed: float, *, final: bool = True) -> dict[str, Any]:
    """Write the results folder; returns the summary (also written as summary.json).

    Called after every finished trial (``final=False`` skips the PNG), so the best
    passing result so far is on disk even if the sweep is interrupted.
    """
    out, s = plan.out, plan.sweep
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results, s)
    objectives = pareto_objectives([r for r in rows if r["status"] == "done"], s)
    front = pareto_front(rows, objectives)
    chosen = choose(results, s)
    write_csv(out / "results.csv", rows)
    write_text(out / "results.md", render_markdown(rows, plan, chosen, front, elapsed))
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
    for r in results:
        if r.status == "done" and r.report:
            write_text(out / "trials" / f"{r.index:03d}" / "report.md", r.report)
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
            f"{s.objective} {assess(chosen, s)['objective_value']:.4g}. Use: shrinkflow run -p {best.relative_to(plan.root)}\n"
        )
        write_text(best, header + text)
    else:
        best.unlink(missing_ok=True)
    summary = {
        "name": s.name,
        "mode": s.search.mode,
        "trials": len(rows),
        "done": sum(r["status"] == "done" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "seconds": round(elapsed, 2),
        "objective": s.objective,
        "criterion": s.criterion.model_dump(),
        "pareto": sorted(on_front),
        "chosen": None if chosen is None else {"trial": chosen.index, "point": chosen.point, **assess(chosen, s)},
        "best_params": str(best.relative_to(plan.root)) if chosen is not None else None,
    }
    write_json(out / "summary.json", summary)
    if final:
        plot_pareto(out / "pareto.png", rows, front, objectives, None if chosen is None else chosen.index)
    return summary
