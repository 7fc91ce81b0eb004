"""One sweep trial: the whole chain in a workspace of its own, watched stage by stage.

A trial never shares a workspace: it copies the project's source files (what git
tracks or would track) into a fresh folder whose ``.dvc/config.local`` points
``cache.dir`` at the project's cache, writes its params there, and runs ``dvc repro``
in a subprocess. Stages whose inputs a previous trial (or the project itself) already
ran are restored from DVC's run-cache instead of being run again.

While DVC runs, the trial watches each stage's manifest appear (``reports/<stage>.json``,
written atomically when the stage ends): that times every stage and gives the validation
quality after it. The drop vs the teacher goes to the trial's Optuna trial; when the
pruner says the trial cannot meet the criterion any more, DVC and its stage are stopped.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flows.ops.dvcrepo import stage_error
from flows.ops.serve import prefect_env, stop
from flows.ops.study import StageReporter
from schemas.metrics import Metrics
from schemas.outputs import DataOutput, read_manifest
from schemas.paths import STAGES, VARIANTS, StagePaths
from schemas.sweep import StudyRef, TrialResult, TrialSpec
from shrinkflow.config import PARAMS_FILE, apply_to_params_file
from shrinkflow.errors import InputError, ParamsError
from shrinkflow.report import quality_drop

#: Files and folders never copied into a trial workspace.
_SKIP = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
#: Seconds between two looks at the workspace's manifests.
POLL_SECONDS = 0.5


# ------------------------------------------------------------------ workspaces


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
    # Committed manifests would look like this trial's stages finishing before they ran.
    for stage in STAGES:
        StagePaths(dest).manifest(stage).unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------ DVC's output


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
    """The most useful line of a failed ``dvc repro``: the stage's own error (on one line), else DVC's last ERROR line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    stage = next((m.group(1) for ln in lines if (m := re.search(r"failed to reproduce '([^']+)'", ln))), None)
    own = stage_error(output)
    err = " ".join(ln.strip() for ln in own.splitlines()) if own else next(
        (ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output"
    )
    return f"{stage}: {err}" if stage else err


def _env(ws: Path, threads: int | None) -> dict[str, str]:
    env = prefect_env(None)  # the venv first on PATH, analytics off
    # Stage commands import the workspace's copy of the code, the one DVC hashed.
    env["PYTHONPATH"] = str(ws) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None, poll: Callable[[], str | None] | None = None
) -> tuple[int | None, str, str | None]:
    """Run ``cmd`` in its own process group, calling ``poll`` every POLL_SECONDS.

    Returns (exit code, output, why it was stopped). On timeout, or when ``poll`` returns
    a reason, the group (DVC and the stage it runs) is stopped and the code is None.
    """
    log = cwd / ".trial-output.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    end = None if timeout is None else time.monotonic() + timeout
    why: str | None = None
    while True:
        try:
            proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        exited = proc.poll() is not None
        if poll is not None:
            why = poll()
        if exited:  # it finished on its own: its outcome stands, whatever the last look said
            why = None
            break
        if why is not None or (end is not None and time.monotonic() >= end):
            why = why or "timeout"
            stop(proc, grace=10)  # SIGTERM to the group, SIGKILL after the grace
            break
    output = log.read_text(errors="replace")
    return (None if why else proc.returncode), output, why


class StageWatcher:
    """Times each stage by its manifest and reports the validation drop after the stages in ``ref``.

    ``poll`` returns the reason to stop the trial once Optuna's pruner says so.
    """

    def __init__(self, ws: Path, ref: StudyRef | None, started: float, reporter: Callable[[StudyRef], Any] = StageReporter):
        self.paths = StagePaths(ws)
        self.ref = ref
        self.reporter = reporter(ref) if ref is not None else None
        self.last = started
        self.seconds: dict[str, float] = {}
        self.drops: dict[str, float] = {}
        self.notes: list[str] = []
        self._key = "accuracy"
        self._teacher: tuple[str, float] | None = None  # quality key, validation figure

    def poll(self) -> str | None:
        for stage in STAGES:
            if stage in self.seconds:
                continue
            path = self.paths.manifest(stage)
            if not path.is_file():
                return None  # stages finish in chain order
            try:
                manifest = read_manifest(stage, self.paths.root)
                mtime = path.stat().st_mtime
            except (OSError, ValueError):
                return None
            self.seconds[stage] = round(max(mtime - self.last, 0.0), 3)
            self.last = max(self.last, mtime)
            if stage == "data":
                self._key = "accuracy" if isinstance(manifest, DataOutput) and manifest.task == "classification" else "mse"
            elif stage == "train_teacher" and manifest.val_metric is not None:
                self._teacher = (self._key, manifest.val_metric)
            elif self.ref is not None and stage in self.ref.stages and self._teacher is not None:
                why = self._report(stage, getattr(manifest, "val_metric", None))
                if why:
                    return why
        return None

    def _report(self, stage: str, val: float | None) -> str | None:
        if val is None:
            return None
        key, teacher = self._teacher
        drop = quality_drop(teacher, val, key, self.ref.relative)
        self.drops[stage] = round(drop, 6) if math.isfinite(drop) else drop
        if self.reporter is None:
            return None
        try:
            stop_now = self.reporter.report(stage, drop)
        except Exception as exc:  # a storage hiccup must not fail a sound trial: go on without early stopping
            self.notes.append(f"early stop off after {stage}: reporting to the study failed ({type(exc).__name__}: {exc})")
            self.reporter = None
            return None
        if stop_now:
            bound = f" > {self.ref.upper:.4g} (criterion.max_drop + early_stop.margin)" if self.ref.upper is not None else ""
            return f"early stop after {stage}: validation {key} drop {drop:.4g}{bound}"
        return None


# ------------------------------------------------------------------ one trial


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial in a fresh workspace; never raises (failures are results).

    ``spec.until``: reproduce only up to this stage (used to train a shared teacher once).
    """
    start = time.time()
    base = dict(index=spec.index, point=spec.point, overrides=spec.overrides, pid=os.getpid(), host=socket.gethostname(), started=start)

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
            code, out, _ = _run([*dvc, "checkout", *dvcfiles], ws, env, timeout)
            if code != 0:
                return result("failed", reason=f"dvc checkout: {failure_reason(out)}")
        watcher = StageWatcher(ws, None if spec.until else spec.study, time.time())
        cmd = [*dvc, "repro", *([spec.until] if spec.until else [])]
        code, out, stopped = _run(cmd, ws, env, None if timeout is None else max(timeout - (time.time() - start), 1.0), watcher.poll)
        ran, reused = _stage_lines(out)
        seen = dict(ran=ran, reused=reused, stage_seconds=watcher.seconds, val_drops=watcher.drops)
        if stopped == "timeout":
            return result("failed", reason=why, **seen)
        if stopped is not None:
            return result("pruned", reason=stopped, **seen)
        if code != 0:
            return result("failed", reason=failure_reason(out), **seen)
        if spec.until:
            return result("done", **seen)
        paths = StagePaths(ws)
        metrics = Metrics.read(ws)
        final = read_manifest("evaluate", ws).final_variant
        row, teacher = metrics[final], metrics[VARIANTS["train_teacher"]]
        if not all(math.isfinite(m.quality) for m in (row, teacher)):
            return result("failed", reason=f"diverged: {row.quality_key} is not finite", **seen)
        report = paths.report.read_text() if paths.report.is_file() else None
        return result(
            "done", final_variant=final, metrics=row, teacher=teacher, report=report,
            workspace=str(ws) if keep else None, reason="; ".join(watcher.notes) or None, **seen,
        )
    except Exception as exc:  # a crashed trial is a result, never the end of the sweep
        return result("failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        if not keep:
            shutil.rmtree(ws, ignore_errors=True)
