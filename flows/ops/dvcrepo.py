"""The one way this project opens its DVC repository from Python, takes its lock, and
snapshots the workspace a retrain run restores when its candidate is not promoted."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from shrinkflow.errors import InputError, ShrinkflowError

if TYPE_CHECKING:
    from dvc.repo import Repo


@contextlib.contextmanager
def open_repo(root: Path | str) -> Iterator[Repo]:
    """``dvc.repo.Repo(root)``, entered with ``root`` as the working directory.

    DVC resolves targets and run-cache paths against the *cwd* (its CLI always runs
    in the repo): from elsewhere a target such as "data" may pick up another
    dvc.yaml, and saving the run-cache fails ("outside of DVC repo"). Callers never
    use it from parallel threads of one process (the cwd is process-wide).
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    with contextlib.chdir(root):
        try:
            repo = Repo(str(root))
        except NotDvcRepoError:
            raise InputError(f"{Path(root).resolve()} is not a DVC project: run `git init && dvc init` there (or pass --root)") from None
        with repo:
            yield repo


class WorkspaceBusy(ShrinkflowError):
    """Another ``dvc repro`` / ``shrinkflow run`` holds the workspace: nothing was changed."""

    exit_code = 75  # EX_TEMPFAIL: try again later


def lock_holder(root: Path) -> str:
    """The PID DVC's lock file names (zc.lockfile writes it there), or '?'."""
    try:
        pid = (Path(root) / ".dvc" / "tmp" / "lock").read_text().strip()
    except OSError:
        return "?"
    return pid if pid.isdigit() else "?"


@contextlib.contextmanager
def workspace_lock(root: Path | str) -> Iterator[None]:
    """Lock the workspace against DVC runs for the block: the block may edit params.yaml.

    Takes DVC's repository lock (what a `dvc repro` holds while it plans and records a stage)
    and a write lock on params.yaml in DVC's per-path locks (a running stage holds a read
    lock on every dependency, params.yaml included, while its command runs). So an edit
    can never change the params of a run in progress: dvc.lock always records what ran.
    DVC retries for about 3 s, then this raises ``WorkspaceBusy`` naming the PID in the way.
    """
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    root = Path(root).resolve()
    with open_repo(root) as repo:
        try:
            repo.lock.lock()
        except LockError:
            raise _busy(root, lock_holder(root)) from None
        try:
            hardlink = repo.config["core"].get("hardlink_lock", False)
            with rwlock(repo.tmp_dir, repo.fs, "shrinkflow (editing params.yaml)", [], [str(root / "params.yaml")], hardlink):
                yield
        except LockError as exc:
            named = re.search(r"PID (\d+)", str(exc))
            raise _busy(root, named.group(1) if named else "?") from None
        finally:
            repo.lock.unlock()


def _busy(root: Path, pid: str) -> WorkspaceBusy:
    return WorkspaceBusy(
        f"the workspace {root} is busy (PID {pid} holds DVC's lock: a `dvc repro` or `shrinkflow run` is working "
        "there); nothing was changed: run again when it has finished"
    )


def pipeline_outputs(root: Path) -> tuple[list[str], list[str]]:
    """dvc.yaml's outputs as (cached, uncached): DVC's cache holds the first, git the second."""
    from dvc.stage import PipelineStage

    with open_repo(root) as repo:
        outs = [out for stage in repo.index.stages if isinstance(stage, PipelineStage) for out in stage.outs]
    cached = sorted({o.def_path for o in outs if o.use_cache})
    uncached = sorted({o.def_path for o in outs if not o.use_cache})
    return cached, uncached


def data_dvcfile(root: Path, data_path: str) -> tuple[str | None, bool]:
    """(``DATA.dvc`` relative to root or None, whether it is an import whose data DVC fetches)."""
    dvcfile = Path(root) / f"{data_path}.dvc"
    if not dvcfile.is_file():
        return None, False
    spec = yaml.safe_load(dvcfile.read_text(encoding="utf-8")) or {}
    return f"{data_path}.dvc", bool(spec.get("deps"))


@dataclass
class Snapshot:
    """What a retrain run may change in the workspace, as it was before the run.

    Files (params.yaml, dvc.lock, the data's .dvc file) and the ``cache: false`` outputs
    (reports, metrics, plots: git holds them, not DVC's cache) are copied aside; outputs
    in DVC's cache are restored from it by ``dvc checkout`` against the restored dvc.lock.
    The data a user dropped into a watched or ``dvc add``-tracked folder is theirs and is
    never touched; an import's data (``dvc update``) is checked out as it was.
    """

    root: Path
    files: list[str]
    uncached: list[str]
    cached: list[str]
    checkout_import: str | None = None
    existed: set[str] = field(default_factory=set)
    _dir: tempfile.TemporaryDirectory | None = None

    @classmethod
    def take(cls, root: Path, data_path: str) -> Snapshot:
        root = Path(root)
        dvcfile, is_import = data_dvcfile(root, data_path)
        cached, uncached = pipeline_outputs(root)
        snap = cls(root=root, files=["params.yaml", "dvc.lock", *([dvcfile] if dvcfile else [])], uncached=uncached,
                   cached=cached, checkout_import=dvcfile if is_import else None, _dir=tempfile.TemporaryDirectory(prefix="shrinkflow-snapshot-"))
        store = Path(snap._dir.name)
        for rel in [*snap.files, *snap.uncached]:
            src = root / rel
            if src.exists():
                snap.existed.add(rel)
                (store / rel).parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, store / rel)
        snap.existed.update(rel for rel in cached if (root / rel).exists())
        return snap

    def restore(self) -> list[str]:
        """Put the workspace back; returns what could not be restored (empty when all was)."""
        store = Path(self._dir.name)
        problems: list[str] = []
        for rel in [*self.files, *self.uncached]:
            dest = self.root / rel
            _remove(dest)
            if rel in self.existed:
                dest.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (store / rel).is_dir() else shutil.copy2)(store / rel, dest)
        targets = ["dvc.yaml", *([self.checkout_import] if self.checkout_import else [])]
        if (self.root / "dvc.lock").exists() or self.checkout_import:
            try:
                with open_repo(self.root) as repo:
                    repo.checkout(targets=targets, force=True)
            except Exception as exc:  # e.g. a cache object gone: say so, the rest is restored
                problems.append(f"dvc checkout: {type(exc).__name__}: {exc}")
        for rel in self.cached:
            if rel not in self.existed:
                _remove(self.root / rel)
        return problems

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def stage_error(output: str) -> str | None:
    """The stage command's own error in what it printed: from its last ``error:`` line on (a
    message may span lines; DVC's ``ERROR:`` line ends it), else the last line of a Python
    traceback; None if neither."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    if starts:
        rest = lines[starts[-1]:]
        end = next((i for i, ln in enumerate(rest) if ln.startswith("ERROR: ")), len(rest))  # DVC's own line after it
        return "\n".join(rest[:end]).removeprefix("error: ")
    tb = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Diverged|Interrupt)\b.*", ln)]
    return tb[-1] if tb else None
