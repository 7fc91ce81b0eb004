"""Publishing: push the pipeline's DVC outputs and run-cache to a DVC remote.

A local folder is the default remote (``dvc remote add -d store ../shrinkflow-store``);
S3 works through dvc-s3 (``dvc remote add -d s3 s3://bucket/path``, plus ``endpointurl``
for S3-compatible servers). With the run-cache pushed, a fresh clone runs
``dvc pull --run-cache && dvc repro`` and recomputes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.ops.dvcrepo import open_repo
from shrinkflow.errors import ShrinkflowError


@dataclass(frozen=True)
class Published:
    remote: str | None
    files: int

    def describe(self) -> str:
        if self.remote is None:
            return "not published: no DVC remote configured (dvc remote add -d NAME URL)"
        return f"pushed {self.files} file(s) and the run-cache to DVC remote {self.remote!r}"


def default_remote(root: Path) -> str | None:
    """The DVC default remote (``core.remote``), or None when none is configured."""
    with open_repo(root) as repo:
        return repo.config.get("core", {}).get("remote") or None


def push_outputs(root: Path, remote: str | None = None) -> Published:
    """``dvc push --run-cache`` to ``remote`` (default: the configured default remote)."""
    from dvc.config import NoRemoteError

    root = Path(root)
    remote = remote or default_remote(root)
    if remote is None:
        return Published(remote=None, files=0)
    with open_repo(root) as repo:
        if remote not in repo.config.get("remote", {}):
            known = ", ".join(repo.config.get("remote", {})) or "none"
            raise ShrinkflowError(f"DVC remote {remote!r} is not configured (configured: {known}); add it with dvc remote add")
        try:
            files = repo.push(remote=remote, run_cache=True)
        except NoRemoteError as exc:  # pragma: no cover - checked above
            raise ShrinkflowError(str(exc)) from exc
    return Published(remote=remote, files=int(files or 0))


def push_git(root: Path, git_remote: str = "origin") -> bool:
    """Push HEAD and the registry's tags to ``git_remote`` when the repository has one."""
    from flows.ops.registry import git

    if git_remote not in git(root, "remote").stdout.split():
        return False
    git(root, "push", git_remote, "HEAD")
    git(root, "push", git_remote, "--tags")
    return True
