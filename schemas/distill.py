"""params.yaml `distill` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from schemas.common import ModelSpec, Optimizer, Section


class DistillParams(Section):
    enabled: bool = Field(True, description="false passes the quantized model through unchanged.")
    student: Literal["compressed"] | ModelSpec = Field(
        "compressed",
        description=(
            "'compressed': keep training the quantize output under the teacher's soft targets, "
            "keeping its zeros and its quantization; or a model spec (e.g. {arch: mlp, hidden: [32]}) "
            "for a new, smaller student trained from the teacher."
        ),
    )
    method: Literal["auto", "logits", "regression"] = Field(
        "auto",
        description="logits: Hinton's softened-softmax KL (classification); regression: MSE to the teacher's outputs; auto picks by task.",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T for the soft targets (soft loss scaled by T²).")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft (teacher) loss; 1 - alpha weighs the hard-label loss.")
    epochs: int = Field(3, ge=0, description="Distillation epochs.")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for distillation.")
