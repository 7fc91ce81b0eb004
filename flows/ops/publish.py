"""Publishing: push the pipeline's DVC outputs and run-cache to a DVC remote, and the
candidate commit and the registry's tags to a git remote.

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


class PushFailed(ShrinkflowError):
    """``git push`` failed; ``rejected`` when the remote refused it (retrying cannot help)."""

    def __init__(self, message: str, rejected: bool):
        super().__init__(message)
        self.rejected = rejected


def has_git_remote(root: Path, git_remote: str) -> bool:
    from flows.ops.registry import git

    return git_remote in git(root, "remote").stdout.split()


def remote_refs(root: Path, git_remote: str, refs: list[str]) -> dict[str, str]:
    """``git ls-remote``: the object id each of ``refs`` (full names) has on the remote; absent ones are left out."""
    from flows.ops.registry import git

    if not refs:
        return {}
    out = git(root, "ls-remote", git_remote, *refs).stdout
    found = {ref: oid for oid, ref in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)}
    return {ref: found[ref] for ref in refs if ref in found}


def missing_tags(root: Path, git_remote: str, tags: dict[str, str]) -> list[str]:
    """Those of ``tags`` (name → object id) the remote does not have: what a later run pushes."""
    from flows.ops.registry import git

    out = git(root, "ls-remote", "--tags", git_remote).stdout
    there = {line.split("\t", 1)[1] for line in out.splitlines() if "\t" in line}
    return sorted(t for t in tags if f"refs/tags/{t}" not in there)


def push_git(root: Path, git_remote: str, refspecs: list[str]) -> None:
    """Push ``refspecs`` atomically: the remote takes all of them or none.

    Raises:
        PushFailed: with ``rejected`` set when the remote refused (non-fast-forward, a
            checked-out branch, a tag that exists): a retry cannot succeed.
    """
    from flows.ops.registry import git

    if not refspecs:
        return
    proc = git(root, "push", "--atomic", "--porcelain", git_remote, *refspecs, check=False)
    if proc.returncode == 0:
        return
    text = "\n".join(ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip() and ln.strip() != "Done")
    rejected = "rejected" in text or "atomic push failed" in text
    raise PushFailed(f"git push {git_remote} {' '.join(refspecs)} {'was refused' if rejected else 'failed'}: {text.strip()}", rejected)
