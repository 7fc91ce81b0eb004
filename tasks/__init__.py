"""One module per stage: ``run(params, ctx) -> <Stage>Output``.

Pure logic: no Prefect, no DVC. ``tasks.run`` dispatches to them for both front
doors (``dvc repro`` and the Prefect flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.paths import StagePaths

if TYPE_CHECKING:
    from schemas.params import Params


@dataclass(frozen=True)
class Context:
    """What a stage needs besides its own params section.

    trusted: modules whose classes the pipeline's model files may name (``arch: module``).
    pipeline: every section of the run, for checks that look ahead (train_teacher asks the
        later stages' methods whether they can work on its model before it trains); never
        what a stage computes from (that is its own section, a DVC params dep).
    """

    paths: StagePaths
    seed: int = 0
    device: str = "cpu"
    trusted: tuple[str, ...] = ()
    pipeline: Params | None = None
