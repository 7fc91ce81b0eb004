"""The model registry: GTO on git tags.

A promoted model is a git commit whose ``dvc.lock`` pins the model files. GTO marks it
with an annotated tag per version (``NAME@v0.0.3``) and moves a stage (``NAME#prod#N``)
to it. The version tag's message carries the model's record (final variant, its file,
its metrics) as JSON, so the production model's numbers travel with the tags and need
no other store.

The retrain flow builds each candidate as a commit *beside* the branch (a temporary
index: ``candidate_commit``); the branch moves to it (``advance``) only once the remote
has it, and a candidate that is not promoted is kept on ``rejected/NAME/TIMESTAMP``
(``archive``), so the workspace and the branch never hold a rejected candidate.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkflow.errors import ShrinkflowError

DEFAULT_NAME = "shrinkflow"
DEFAULT_STAGE = "prod"
#: Fallback identity for commits and tags when git has none (e.g. a fresh worker host).
BOT = ("shrinkflow retrain", "shrinkflow-retrain@localhost")


@dataclass(frozen=True)
class Version:
    """A registered model version."""

    name: str
    version: str
    tag: str
    commit: str
    record: dict[str, Any]


def git(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run git in ``root`` (``env`` adds variables); raise ShrinkflowError with git's message when it fails."""
    env = {**os.environ, **(env or {})}
    ident = _identity(root)
    if ident is not None:  # git has no identity: commit as the bot rather than fail
        env.setdefault("GIT_AUTHOR_NAME", ident[0])
        env.setdefault("GIT_AUTHOR_EMAIL", ident[1])
        env.setdefault("GIT_COMMITTER_NAME", ident[0])
        env.setdefault("GIT_COMMITTER_EMAIL", ident[1])
    proc = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ShrinkflowError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _identity(root: Path) -> tuple[str, str] | None:
    """``BOT`` when neither the environment nor git config names a committer, else None."""
    if os.environ.get("GIT_COMMITTER_EMAIL") and os.environ.get("GIT_AUTHOR_EMAIL"):
        return None
    proc = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True)
    return None if proc.stdout.strip() else BOT


def _author(root: Path) -> tuple[str | None, str | None]:
    ident = _identity(root)
    if ident is not None:
        return ident
    return os.environ.get("GIT_AUTHOR_NAME"), os.environ.get("GIT_AUTHOR_EMAIL")


def head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD").stdout.strip()


def branch(root: Path) -> str | None:
    """The checked-out branch, or None when HEAD is detached."""
    proc = git(root, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    return proc.stdout.strip() or None


def _committable(root: Path, paths: list[str], force: list[str]) -> tuple[list[str], list[str]]:
    wanted = [p for p in paths if (root / p).exists() and git(root, "check-ignore", "-q", p, check=False).returncode != 0]
    return wanted, [p for p in force if (root / p).exists()]


def candidate_commit(root: Path, paths: list[str], message: str, force: list[str] = ()) -> str:
    """A commit on top of HEAD holding ``paths`` (those git does not ignore) and ``force`` (even if ignored).

    Built in a temporary index: no branch moves and the user's index is untouched, so the
    commit can become the branch's next commit (``advance``) or be archived (``archive``).
    Returns HEAD itself when the files are already as committed.
    """
    import tempfile

    wanted, forced = _committable(root, list(paths), list(force))
    parent = head(root)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(root, "read-tree", parent, env=env)
        if wanted:
            git(root, "add", "-A", "--", *wanted, env=env)
        if forced:
            git(root, "add", "-f", "-A", "--", *forced, env=env)
        tree = git(root, "write-tree", env=env).stdout.strip()
    if tree == git(root, "rev-parse", f"{parent}^{{tree}}").stdout.strip():
        return parent
    return git(root, "commit-tree", tree, "-p", parent, "-m", message).stdout.strip()


def committed_paths(root: Path, commit: str) -> list[str]:
    """Paths ``commit`` changed relative to its first parent."""
    return [p for p in git(root, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{commit}^", commit).stdout.splitlines() if p]


def advance(root: Path, commit: str, expected: str) -> None:
    """Make ``commit`` (a child of ``expected``) the checked-out branch's head and stage its files.

    Compare-and-swap: fails if HEAD moved away from ``expected`` meanwhile. Only the index
    entries of the files the commit changed are updated; the working tree already holds them.
    """
    if commit == expected:
        return
    git(root, "update-ref", "-m", "retrain: promote candidate", "HEAD", commit, expected)
    changed = committed_paths(root, commit)
    if changed:
        git(root, "reset", "-q", commit, "--", *changed)


def archive(root: Path, commit: str, name: str = DEFAULT_NAME) -> str:
    """Keep ``commit`` on a branch ``rejected/NAME/UTC-TIMESTAMP``; returns the branch name."""
    import datetime

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    ref, n = f"rejected/{name}/{stamp}", 1
    while git(root, "rev-parse", "-q", "--verify", f"refs/heads/{ref}", check=False).returncode == 0:
        n += 1
        ref = f"rejected/{name}/{stamp}-{n}"
    git(root, "update-ref", f"refs/heads/{ref}", commit)
    return ref


def same_model(root: Path, commit: str, other: str | None = "HEAD") -> bool:
    """True when ``other`` (a commit; None: the working tree) pins the same pipeline results as ``commit``:
    identical dvc.lock and params.yaml."""
    revs = [commit] if other is None else [commit, other]
    return git(root, "diff", "--quiet", *revs, "--", "dvc.lock", "params.yaml", check=False).returncode == 0


def _record_from_message(message: str) -> dict[str, Any]:
    start = message.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(message[start:])
    except json.JSONDecodeError:
        return {}


def _tag_message(root: Path, tag: str) -> str:
    return git(root, "for-each-ref", f"refs/tags/{tag}", "--format=%(contents)").stdout


def in_stage(root: Path, name: str = DEFAULT_NAME, stage: str = DEFAULT_STAGE) -> Version | None:
    """The version now assigned to ``stage`` (None when none is)."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        found = api.find_versions_in_stage(str(root), name, stage)
    except ArtifactNotFound:  # nothing registered under this name yet
        return None
    if not found:
        return None
    vs = found[0] if isinstance(found, list) else found
    tag = f"{name}@{vs.version}"
    return Version(name=name, version=vs.version, tag=tag, commit=vs.commit_hexsha, record=_record_from_message(_tag_message(root, tag)))


def version_at(root: Path, commit: str, name: str = DEFAULT_NAME) -> str | None:
    """The version tag of ``name`` on ``commit``, if one was registered there."""
    tags = git(root, "tag", "--points-at", commit).stdout.split()
    found = [t for t in tags if t.startswith(f"{name}@")]
    return found[0] if found else None


def registry_tags(root: Path, name: str = DEFAULT_NAME) -> dict[str, str]:
    """GTO's tags of ``name`` (versions ``NAME@v..`` and assignments ``NAME#STAGE#N``) → tag object id."""
    out = git(root, "for-each-ref", "--format=%(refname:short) %(objectname)", f"refs/tags/{name}@*", f"refs/tags/{name}#*").stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def delete_tags(root: Path, tags: list[str]) -> None:
    """Delete local tags (the rollback of an assignment that could not be published)."""
    if tags:
        git(root, "tag", "-d", *tags)


def register_and_assign(root: Path, record: dict[str, Any], name: str = DEFAULT_NAME, stage: str = DEFAULT_STAGE,
                        commit: str | None = None) -> Version:
    """Register ``commit`` (default HEAD) as the next version of ``name`` (unless it already is one) and assign ``stage`` to it."""
    from gto import api

    commit = commit or head(root)
    author, email = _author(root)
    existing = version_at(root, commit, name)
    if existing is None:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in record.get("metrics", {}).items() if isinstance(v, float) and k in ("accuracy", "mse"))
        message = f"{name}: {record.get('final_variant', 'model')} ({summary})\n\n{json.dumps(record, indent=2, sort_keys=True)}\n"
        reg = api.register(str(root), name, commit, message=message, author=author, author_email=email)
        version = reg.version
    else:
        version = existing.split("@", 1)[1]
    api.assign(str(root), name, stage, version=version, message=f"{name} {version} → {stage}", author=author, author_email=email)
    tag = f"{name}@{version}"
    return Version(name=name, version=version, tag=tag, commit=commit, record=_record_from_message(_tag_message(root, tag)))
