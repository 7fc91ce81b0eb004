"""Reproduce one DVC stage in-process, so DVC alone decides whether it runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def ensure_venv_on_path() -> None:
    """Make stage commands (``shrinkflow stage NAME``) resolve to this interpreter's venv.

    Workers and schedulers may start without the venv's bin/ on PATH.
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def reproduce(root: Path, stage: str) -> bool:
    """``dvc repro --single-item STAGE``; True when the stage ran, False when it was cached."""
    from dvc.repo import Repo

    ensure_venv_on_path()
    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage, single_item=True)
    return bool(ran)
