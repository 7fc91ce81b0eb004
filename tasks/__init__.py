"""One module per stage: ``run(params, ctx) -> <Stage>Output``.

Pure logic: no Prefect, no DVC. ``tasks.run`` dispatches to them for both front
doors (``dvc repro`` and the Prefect flow).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.paths import StagePaths


@dataclass(frozen=True)
class Context:
    """What a stage needs besides its own params section.

    trusted: modules whose classes the pipeline's model files may name (``arch: module``).
    """

    paths: StagePaths
    seed: int = 0
    device: str = "cpu"
    trusted: tuple[str, ...] = ()
