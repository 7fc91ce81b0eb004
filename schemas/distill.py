"""params.yaml `distill` section: one variant per `distill.method`.

Every method shares the student, the transfer set and the training budget; each
adds only the keys its loss needs (``hint`` its layer names and weight).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.common import TEACHER_EPOCHS, ModelSpec, Optimizer, Section, registry

#: A compressed student's recovery budget (the defaults below); a new student gets a teacher's.
RECOVERY_EPOCHS, RECOVERY_LR = 3, 0.01


class _DistillBase(Section):
    enabled: bool = Field(True, description="false passes the quantized model through unchanged.")
    student: Literal["compressed"] | ModelSpec = Field(
        "compressed",
        description=(
            "'compressed': keep training the quantize output under the teacher's soft targets, "
            "keeping its zeros and its quantization; or a model spec (e.g. {arch: mlp, hidden: [32]}) "
            "for a new, smaller student trained from the teacher."
        ),
    )
    use_labels: bool = Field(
        True,
        description=(
            "false: the transfer set (the training split) is used without its labels: the loss is the "
            "teacher term alone and alpha is not used."
        ),
    )
    transfer_limit: PositiveInt | None = Field(
        None,
        description=(
            "Distil on only the first N examples of the training split (the transfer set; Hinton et al. 2015 "
            "used 3 % of MNIST to show what soft targets carry); null = the whole training split. The teacher "
            "was trained on all of it."
        ),
    )
    epochs: int = Field(
        RECOVERY_EPOCHS, ge=0,
        description="Distillation epochs. The default (3) is a compressed student's short recovery; a new student "
        "(a model spec) trains from scratch and by default gets the teacher's budget: train_teacher.epochs, "
        "batch_size and optimizer.",
    )
    batch_size: PositiveInt = Field(64, description="Mini-batch size (a new student: train_teacher.batch_size by default).")
    optimizer: Optimizer = Field(
        default_factory=lambda: Optimizer(lr=RECOVERY_LR),
        description="Optimizer for distillation (default lr 0.01; a new student: train_teacher.optimizer by default).",
    )

    @model_validator(mode="before")
    @classmethod
    def _new_student_budget(cls, data: Any) -> Any:
        # Outside a params file (no teacher section to copy), a new student still gets a
        # teacher's default budget rather than a compressed student's recovery.
        if isinstance(data, dict) and is_new_student(data.get("student", "compressed")):
            data = {"epochs": TEACHER_EPOCHS, "optimizer": {}, **data}
        return data


class _SoftTargets(_DistillBase):
    temperature: float = Field(
        4.0, gt=0, le=100, description="Softmax temperature T for the soft targets (soft loss scaled by T²)."
    )
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the teacher loss; 1 - alpha weighs the hard-label loss.")


class AutoDistill(_SoftTargets):
    method: Literal["auto"] = Field("auto", description="logits for classification data, regression for regression data.")


class LogitsDistill(_SoftTargets):
    method: Literal["logits"] = Field(
        "logits",
        description="Hinton et al. 2015: KL between softened softmaxes at temperature T, mixed with the hard-label loss.",
    )


class RegressionDistill(_DistillBase):
    method: Literal["regression"] = Field("regression", description="MSE to the teacher's outputs, mixed with MSE to the targets.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the MSE to the teacher; 1 - alpha weighs the MSE to the targets.")


class HintDistill(_SoftTargets):
    method: Literal["hint"] = Field(
        "hint",
        description=(
            "FitNets (Romero et al. 2015): also match an intermediate layer of the teacher through a learned "
            "projection of the student's layer; the output loss is logits (classification) or regression."
        ),
    )
    teacher_layer: str = Field(
        min_length=1,
        description="Name of the teacher module whose output is the hint, as in model.named_modules() (e.g. 'net.2').",
    )
    student_layer: str = Field(
        min_length=1,
        description="Name of the student module (the guided layer) mapped onto the hint by the learned projection.",
    )
    weight: float = Field(1.0, ge=0, description="Weight of the hint loss (MSE of the projected student layer to the hint).")
    hint_epochs: int = Field(
        0,
        ge=0,
        description=(
            "FitNets' first stage: epochs that train only the student up to student_layer (and the projection) "
            "on the hint loss, before the `epochs` of output plus hint loss. 0 = skip."
        ),
    )


def is_new_student(student: Any) -> bool:
    """True when ``distill.student`` names a model to train from scratch (not ``compressed``)."""
    return student != "compressed" and student is not None


DistillParams = registry("method", "auto", AutoDistill, LogitsDistill, RegressionDistill, HintDistill)

__all__ = ["AutoDistill", "DistillParams", "HintDistill", "LogitsDistill", "RegressionDistill"]
