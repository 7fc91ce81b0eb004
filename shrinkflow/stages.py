"""Run one stage: the single entry both front doors use (``shrinkflow stage NAME``)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from schemas.outputs import STAGE_OUTPUTS, StageOutput
from schemas.params import Params
from shrinkflow.io import write_json
from shrinkflow.paths import STAGES, StagePaths
from tasks import Context


def run_stage(name: str, params: Params, root: Path) -> StageOutput:
    """Run stage ``name`` with its params section; write and return its manifest."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    paths = StagePaths(Path(root))
    module = importlib.import_module(f"tasks.{name}")
    output: StageOutput = module.run(getattr(params, name), Context(paths=paths, seed=params.seed, device=params.device))
    write_json(paths.manifest(name), output.model_dump(mode="json"))
    return output


def read_manifest(name: str, root: Path) -> StageOutput:
    """The typed manifest a stage last wrote."""
    path = StagePaths(Path(root)).manifest(name)
    return STAGE_OUTPUTS[name].model_validate(json.loads(path.read_text(encoding="utf-8")))
