"""The one way this project opens its DVC repository from Python."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo
