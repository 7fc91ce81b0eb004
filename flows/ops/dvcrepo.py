"""The one way this project opens its DVC repository from Python, and takes its lock."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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
