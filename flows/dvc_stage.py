"""Reproduce one DVC stage in-process, so DVC alone decides whether it runs."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.ops.dvcrepo import open_repo


def ensure_venv_on_path() -> None:
    """Make stage commands (``shrinkflow stage NAME``) resolve to this interpreter's venv.

    Workers and schedulers may start without the venv's bin/ on PATH.
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


#: Lines Prefect's own console handler writes ("12:00:01.234 | INFO | ..."): already in the run's logs.
_PREFECT_CONSOLE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")


@contextlib.contextmanager
def _output_to(log: Callable[[str], None] | None, stage: str) -> Iterator[None]:
    """Send what the stage command prints (DVC runs it with our stdout/stderr) to ``log``.

    DVC gives no hook on the command's output, so file descriptors 1 and 2 are pointed at
    a temporary file while the stage runs; the text is logged even when the stage fails.
    """
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as buf:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            buf.seek(0)
            text = buf.read().decode("utf-8", errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip() and not _PREFECT_CONSOLE.match(ln)]
            if lines:
                log(f"{stage} output:\n" + "\n".join(lines))


def reproduce(root: Path, stage: str, log: Callable[[str], None] | None = None) -> bool:
    """``dvc repro --single-item STAGE``; True when the stage ran, False when it was cached.

    Args:
        log: receives the stage command's output (e.g. a Prefect run logger's ``info``).
    """
    ensure_venv_on_path()
    with open_repo(root) as repo, _output_to(log, stage):
        # No "git add dvc.lock / dvc config core.autostage" hint after every stage: the
        # orchestrator decides what is committed (the retrain flow commits the candidate).
        repo.scm_context.quiet = True
        ran = repo.reproduce(stage, single_item=True)
    return bool(ran)
