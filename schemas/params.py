"""The params.yaml contract: one frozen model per stage section.

Every field carries a description: ``shrinkflow schema`` exports them as JSON Schema
for editors, and the README's parameter reference is generated from the same text.
Unknown keys are rejected (``extra="forbid"``) so a typo never silently falls back
to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.common import (
    TEACHER_EPOCHS,
    Finetune,
    LeNet5Spec,
    MLPSpec,
    ModelSpec,
    ModuleSpec,
    Optimizer,
    Section,
    registry,
)
from schemas.data import (
    DataParams,
    DigitsData,
    MnistData,
    NpzData,
    SyntheticRegressionData,
)
from schemas.distill import AutoDistill, DistillParams, is_new_student
from schemas.evaluate import EvaluateParams, Gates
from schemas.prune import MagnitudePrune, PruneParams
from schemas.quantize import DynamicQuant, QuantizeParams

__all__ = [
    "DataParams", "DigitsData", "DistillParams", "DynamicQuant", "EvaluateParams", "Finetune", "Gates",
    "LeNet5Spec", "MLPSpec", "MagnitudePrune", "MnistData", "ModelSpec", "ModuleSpec", "NpzData", "Optimizer",
    "Params", "PruneParams", "QuantizeParams", "SyntheticRegressionData", "TrainTeacherParams", "registry",
]


class TrainTeacherParams(Section):
    model: ModelSpec = Field(default_factory=MLPSpec, description="Architecture of the teacher.")
    epochs: PositiveInt = Field(TEACHER_EPOCHS, description="Training epochs.")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer settings.")
    checkpoint: str | None = Field(
        None,
        description=(
            "Import an already-trained model instead of training: a plain state dict (.pt, "
            "loaded with weights_only=True) matching ``model``, or a shrinkflow model file. "
            "Track the file with ``dvc add`` so a new checkpoint re-runs the chain."
        ),
    )


class Params(Section):
    """Everything the pipeline does, in one file."""

    seed: int = Field(0, ge=0, description="Seed for data splits, initialisation and shuffling.")
    trusted_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")]] = Field(
        default_factory=list,
        description="Python modules (e.g. mypkg.nets) whose classes model files read by the pipeline may name "
        "(arch: module); loading such a file imports that module. The modules of the model specs in this file "
        "(train_teacher.model, distill.student) are trusted already.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto takes CUDA when present. Evaluation is always on CPU."
    )
    data: DataParams = Field(default_factory=DigitsData, description="Where the data comes from and how it is split.")
    train_teacher: TrainTeacherParams = Field(default_factory=TrainTeacherParams, description="Train (or import) the teacher.")
    prune: PruneParams = Field(default_factory=MagnitudePrune, description="Prune the teacher.")
    quantize: QuantizeParams = Field(default_factory=DynamicQuant, description="Quantize the pruned model.")
    distill: DistillParams = Field(default_factory=AutoDistill, description="Distill from the teacher.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Measure every variant side by side.")

    @model_validator(mode="before")
    @classmethod
    def _new_student_gets_the_teachers_budget(cls, data: Any) -> Any:
        """A new distillation student trains from scratch: unless its section says otherwise it gets
        the teacher's epochs, batch size and optimizer (the recovery defaults are for compressed students)."""
        if not isinstance(data, dict) or not isinstance(data.get("distill"), dict):
            return data
        distill = data["distill"]
        if not is_new_student(distill.get("student", "compressed")):
            return data
        teacher = data.get("train_teacher") if isinstance(data.get("train_teacher"), dict) else {}
        budget = {k: teacher[k] for k in ("epochs", "batch_size", "optimizer") if k in teacher}
        return {**data, "distill": {**budget, **distill}}

    @model_validator(mode="after")
    def _task_fits_method(self) -> Params:
        if isinstance(self.data, SyntheticRegressionData) and self.distill.method == "logits":
            raise ValueError(
                "distill.method 'logits' needs class labels, but data.source synthetic-regression is "
                "a regression task: use distill.method: regression (or auto)"
            )
        return self


def trusted(params: Params) -> tuple[str, ...]:
    """Modules model files in this pipeline may name: ``trusted_modules`` plus the specs' own classes."""
    out = list(params.trusted_modules)
    for spec in (params.train_teacher.model, params.distill.student):
        if getattr(spec, "arch", None) == "module":
            out.append(spec.import_)
    return tuple(dict.fromkeys(out))
