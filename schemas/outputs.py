"""What each stage writes: a typed manifest at reports/<stage>.json.

DVC tracks the manifests as metrics; Prefect tasks return them. They hold paths and
numbers, never tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.paths import StagePaths


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelFile(_Out):
    path: str = Field(description="The model file, relative to the project root.")
    size_bytes: int = Field(description="os.path.getsize of that file.")
    params: int = Field(description="Parameters of the model as loaded.")
    nonzero_params: int = Field(description="Parameters that are not exactly zero.")
    format: str = Field(description="How the weights are stored (see shrinkflow.artifacts).")


class StageOutput(_Out):
    stage: str


class DataOutput(StageOutput):
    stage: Literal["data"] = "data"
    source: str
    task: Literal["classification", "regression"]
    n_classes: int = Field(description="Number of classes; 0 for regression.")
    classes: list[str] | None = Field(
        None, description="Label of each class 0..K-1 when the source's labels were not integers 0..K-1 (data.task: classification)."
    )
    input_shape: list[int]
    n_train: int
    n_val: int
    n_test: int
    splits: str


class TrainTeacherOutput(StageOutput):
    stage: Literal["train_teacher"] = "train_teacher"
    model: ModelFile
    imported: bool = Field(description="True when the teacher was imported from train_teacher.checkpoint.")
    epochs: int
    val_metric: float | None = Field(description="Validation accuracy (or MSE) after training; null without a validation split.")
    seconds: float


class PruneOutput(StageOutput):
    stage: Literal["prune"] = "prune"
    enabled: bool
    model: ModelFile
    sparsity: float = Field(description="Measured share of zeros among prunable weights.")
    layer_sparsity: dict[str, float]
    val_metric: float | None
    method: str | None = Field(None, description="The pruning method that ran; null when disabled.")
    schedule: str | None = Field(None, description="one-shot | iterative | gradual; null when disabled.")
    macs: int | None = Field(None, description="Multiply-accumulates per example (dense count: zeros included); null if not countable.")
    teacher_macs: int | None = Field(None, description="The input model's MACs per example, for comparison.")
    teacher_params: int | None = Field(None, description="The input model's parameter count, for comparison.")
    allocation: dict[str, float] | None = Field(None, description="Per-layer targets used (allocation: auto).")
    sensitivity: str | None = Field(None, description="The sensitivity table (markdown), when prune.sensitivity is on.")


class QuantizeOutput(StageOutput):
    stage: Literal["quantize"] = "quantize"
    enabled: bool
    model: ModelFile
    method: str
    sparsity: float | None = Field(None, description="Share of zeros among prunable weights after quantization.")
    val_metric: float | None = Field(None, description="Validation accuracy (or MSE) of the quantized model as loaded.")


class DistillOutput(StageOutput):
    stage: Literal["distill"] = "distill"
    enabled: bool
    model: ModelFile
    student: str
    val_metric: float | None
    method: str | None = Field(None, description="The distillation method that ran (auto resolved); null when disabled.")
    input_val_metric: float | None = Field(
        None, description="Validation metric of the compressed model before recovery; null for a new student."
    )


class GateResult(_Out):
    name: str
    limit: float
    value: float
    passed: bool


class EvaluateOutput(StageOutput):
    stage: Literal["evaluate"] = "evaluate"
    metrics: str
    report: str
    final_variant: str
    gates: list[GateResult]
    passed: bool


STAGE_OUTPUTS: dict[str, type[StageOutput]] = {
    "data": DataOutput,
    "train_teacher": TrainTeacherOutput,
    "prune": PruneOutput,
    "quantize": QuantizeOutput,
    "distill": DistillOutput,
    "evaluate": EvaluateOutput,
}


def read_manifest(name: str, root: Path) -> StageOutput:
    """The typed manifest stage ``name`` last wrote under the project ``root``."""
    path = StagePaths(Path(root)).manifest(name)
    return STAGE_OUTPUTS[name].model_validate(json.loads(path.read_text(encoding="utf-8")))
