"""Typed contracts: params.yaml (``params``) and what every stage writes (``outputs``)."""

from schemas.outputs import STAGE_OUTPUTS, StageOutput
from schemas.params import Params

__all__ = ["Params", "STAGE_OUTPUTS", "StageOutput"]
