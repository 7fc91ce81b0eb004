"""Reproduce one DVC stage in-process, so DVC alone decides whether it runs."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.ops.dvcrepo import WorkspaceBusy, lock_holder, open_repo, stage_error
from shrinkflow.errors import ShrinkflowError


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


class StageFailed(ShrinkflowError):
    """A stage's command failed: its own error message, and its exit status (2 for bad input)."""

    def __init__(self, stage: str, message: str, status: int | None) -> None:
        self.stage = stage
        self.exit_code = status if status else 1
        super().__init__(f"stage {stage!r} failed{f' (exit {status})' if status else ''}: {message}")


@contextlib.contextmanager
def _output_to(log: Callable[[str], None] | None, stage: str, captured: list[str]) -> Iterator[None]:
    """Send what the stage command prints (DVC runs it with our stdout/stderr) to ``log``, and
    keep it in ``captured``.

    DVC gives no hook on the command's output, so file descriptors 1 and 2 are pointed at
    a temporary file while the stage runs; the text is kept even when the stage fails.
    """
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
            captured.append("\n".join(lines))
            if lines and log is not None:
                log(f"{stage} output:\n" + "\n".join(lines))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and its causes, outermost first."""
    seen = 0
    while exc is not None and seen < 20:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _exit_status(exc: BaseException) -> int | None:
    """The stage command's exit status, from DVC's "failed to run: CMD, exited with N" in the cause chain."""
    found = (re.search(r"exited with (-?\d+)", str(e)) for e in _chain(exc))
    return next((int(m.group(1)) for m in found if m), None)


def reproduce(root: Path, stage: str, log: Callable[[str], None] | None = None) -> bool:
    """``dvc repro --single-item STAGE``; True when the stage ran, False when it was cached.

    Args:
        log: receives the stage command's output (e.g. a Prefect run logger's ``info``).

    Raises:
        StageFailed: the stage's command failed (its own message and exit status), or DVC
            could not run it (DVC's message).
    """
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    ensure_venv_on_path()
    captured: list[str] = []
    try:
        with open_repo(root) as repo, _output_to(log, stage, captured):
            # No "git add dvc.lock / dvc config core.autostage" hint after every stage: the
            # orchestrator decides what is committed (the retrain flow commits the candidate).
            repo.scm_context.quiet = True
            ran = repo.reproduce(stage, single_item=True)
    except DvcException as exc:
        lock = next((e for e in _chain(exc) if isinstance(e, LockError)), None)
        if lock is not None:
            named = re.search(r"PID (\d+)", str(lock))  # DVC's per-output lock names the blocking process
            raise WorkspaceBusy(
                f"the workspace {Path(root)} is busy (PID {named.group(1) if named else lock_holder(Path(root))} "
                f"holds DVC's lock: a `dvc repro` or `shrinkflow run` is working there); stage {stage!r} did not run: "
                "run again when it has finished"
            ) from None
        own = stage_error(captured[-1] if captured else "")
        raise StageFailed(stage, own or _dvc_message(exc), _exit_status(exc)) from exc
    return bool(ran)


def _dvc_message(exc: BaseException) -> str:
    """DVC's own explanation (e.g. a missing output), innermost cause last."""
    parts: list[str] = []
    for e in _chain(exc):
        text = str(e).strip()
        if text and text not in parts:
            parts.append(text)
    return ": ".join(parts[:4])
