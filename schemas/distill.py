"""params.yaml `distill` section: one variant per `distill.method`.

Every method shares the student, the transfer set and the training budget; each
adds only the keys its loss needs (``hint`` its layer names and weight).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from schemas.common import ModelSpec, Optimizer, Section, registry


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
    epochs: int = Field(3, ge=0, description="Distillation epochs.")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for distillation.")


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


DistillParams = registry("method", "auto", AutoDistill, LogitsDistill, RegressionDistill, HintDistill)

__all__ = ["AutoDistill", "DistillParams", "HintDistill", "LogitsDistill", "RegressionDistill"]
