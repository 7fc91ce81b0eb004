"""Shared fixtures: a real git + DVC project in a temp dir, small data, CLI helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: What a project needs to run the pipeline: the DVC pipeline and every code dep it lists.
PROJECT_FILES = ["dvc.yaml", "params.yaml", "data/raw/README.md", "shrinkflow", "tasks", "schemas", "flows"]


def project_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1",
        GIT_AUTHOR_NAME="shrinkflow tests",
        GIT_AUTHOR_EMAIL="tests@shrinkflow.invalid",
        GIT_COMMITTER_NAME="shrinkflow tests",
        GIT_COMMITTER_EMAIL="tests@shrinkflow.invalid",
    )
    env.pop("PREFECT_API_URL", None)
    env.update(extra or {})
    return env


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600):
    """Run a command; on failure show its output in the assertion."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or project_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def make_project(dest: Path, params_text: str | None = None) -> Path:
    """A fresh git + DVC repository holding the pipeline, committed once."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".gitignore").write_text("/data/prepared/\n/models/\n/reports/\n__pycache__/\n")
    if params_text is not None:
        (dest / "params.yaml").write_text(params_text)
    sh(["git", "init", "-q"], dest)
    sh([str(BIN / "dvc"), "init", "-q"], dest)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "project"], dest)
    return dest


#: Small but honest training budget for tests on digits.
FAST = [
    "train_teacher.epochs=8",
    "prune.finetune.epochs=1",
    "distill.epochs=1",
    "evaluate.min_run_time=0.05",
]


def set_params(root: Path, overrides: list[str]) -> None:
    from shrinkflow.config import apply_to_params_file

    apply_to_params_file(root / "params.yaml", overrides=overrides)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj")
    set_params(root, FAST)
    return root


def dvc(root: Path, *args: str, check: bool = True):
    return sh([str(BIN / "dvc"), *args], root, check=check)


def ran_stages(output: str) -> list[str]:
    """Stage names `dvc repro` printed as running."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
