"""Stage dispatch: run one stage (``shrinkflow stage NAME``, the command each dvc.yaml stage runs)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from schemas.outputs import StageOutput
from schemas.params import Params, trusted
from schemas.paths import STAGES, StagePaths
from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.io import write_json
from tasks import Context


def run_stage(name: str, params: Params, root: Path) -> StageOutput:
    """Run stage ``name`` with its params section; write and return its manifest."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    paths = StagePaths(Path(root))
    # Imported by name so that a stage loads only its own module (dvc.yaml lists its imports).
    module = importlib.import_module(f"tasks.{name}")
    output: StageOutput = module.run(getattr(params, name), Context(paths=paths, seed=params.seed, device=params.device, trusted=trusted(params), pipeline=params))
    write_json(paths.manifest(name), output.model_dump(mode="json"))
    return output


def main(name: str, params_file: Path) -> int:
    """``shrinkflow stage NAME``: run one stage in the current directory; the exit status.

    A user error (bad params, bad data, a diverged training) prints one line, ``error: ...``,
    and exits with its status (2 for bad input); the stage's own log goes to stderr.
    """
    if name not in STAGES:
        print(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        out = run_stage(name, load_params(params_file), Path.cwd())
    except ShrinkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{name}: done ({type(out).__name__} → reports/{name}.json)")
    return 0
