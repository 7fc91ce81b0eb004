"""One module per stage: ``run(params, ctx) -> <Stage>Output``.

Pure logic: no Prefect, no DVC. ``shrinkflow.stages`` calls them for both front
doors (``dvc repro`` and the Prefect flow).
"""

from __future__ import annotations

from dataclasses import dataclass

from shrinkflow.paths import StagePaths


@dataclass(frozen=True)
class Context:
    """What a stage needs besides its own params section."""

    paths: StagePaths
    seed: int = 0
    device: str = "cpu"
