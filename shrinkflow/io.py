"""Files: atomic writes (a stage killed midway leaves no half-written file behind), and telling
a model file's format from its first bytes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

#: The packed format's magic bytes (PNG-style: catches text-mode copies); see ``shrinkflow.packing.container``.
PACKED_MAGIC = b"\x89SFZ\r\n\x1a\n"


def model_file_kind(path: str | os.PathLike[str]) -> Literal["sfz", "torch"] | None:
    """``sfz`` for a packed model, ``torch`` for what ``torch.save`` writes (a zip archive, or the
    legacy pickle), None for anything else or an unreadable path. Reads 8 bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PACKED_MAGIC))
    except OSError:
        return None
    if head == PACKED_MAGIC:
        return "sfz"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600; the result keeps the mode of the file it replaces, or
        # gets the mode any new file gets here (0666 less the umask), as open() would give it.
        os.chmod(tmp, _mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system tells (Linux); else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
