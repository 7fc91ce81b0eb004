"""``reports/changes/changes.json``: what compression changed, per variant, against the teacher.

Written by the evaluate stage (``shrinkflow.changes``), read typed by ``shrinkflow changes``,
the report and the Prefect artifacts. Every figure is measured on the test split from the
outputs of the very files whose sizes ``reports/metrics.json`` reports.

Classification: per-class accuracy and its change, the confusion difference, inputs newly
wrong / newly right, expected calibration error (15 equal-width bins, Guo et al. 2017) with
its reliability diagram, agreement by teacher-confidence bucket, and the most confident
flips. Regression: error per target, error change by target quantile, the inputs whose
outputs changed most.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.paths import StagePaths


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Chance(_Row):
    """The quality of the best constant predictor on the test split, and the bar a teacher must clear."""

    metric: Literal["accuracy", "mse"]
    baseline: float = Field(description="Majority-class accuracy, or the variance of y (the MSE of predicting its mean).")
    limit: float = Field(
        description="Accuracy the teacher must exceed (or MSE it must stay under): the baseline moved by 2.33 "
        "standard errors, so a teacher is flagged unless it beats chance at one-sided 99 % confidence."
    )
    teacher: float = Field(description="The teacher's test accuracy (or MSE).")
    passed: bool
    detail: str = Field(description="The baseline in words (which class is the majority, how many inputs).")


# ------------------------------------------------------------------ classification


class ClassRow(_Row):
    label: int = Field(description="Class index.")
    n: int = Field(description="Test inputs of this class.")
    teacher_accuracy: float | None = Field(description="The teacher's accuracy on the class; null when n is 0.")
    accuracy: float | None = Field(description="This variant's accuracy on the class; null when n is 0.")
    delta: float | None = Field(description="accuracy - teacher_accuracy (fraction; -0.02 = the class lost 2 pp).")


class ConfusionCell(_Row):
    actual: int
    predicted: int
    teacher: int = Field(description="Test inputs of class `actual` the teacher predicts as `predicted`.")
    variant: int = Field(description="The same count for this variant.")
    delta: int = Field(description="variant - teacher.")


class Bin(_Row):
    """One bin of a reliability diagram (confidence = largest softmax probability)."""

    lo: float
    hi: float
    n: int
    confidence: float | None = Field(description="Mean confidence of the inputs in the bin; null when empty.")
    accuracy: float | None = Field(description="Accuracy of the inputs in the bin; null when empty.")


class Bucket(_Row):
    """Test inputs whose teacher confidence lies in (lo, hi]."""

    lo: float
    hi: float
    n: int
    agreement: float | None = Field(description="Share where the variant predicts what the teacher predicts; null when empty.")
    teacher_accuracy: float | None
    accuracy: float | None


class Flip(_Row):
    """A test input on which the variant's prediction differs from the teacher's."""

    index: int = Field(description="Row of the test split.")
    label: int = Field(description="True class.")
    teacher: int = Field(description="The teacher's prediction.")
    teacher_confidence: float
    variant: int = Field(description="The variant's prediction.")
    variant_confidence: float
    kind: Literal["newly_wrong", "newly_right", "both_wrong"]


class ClassificationChanges(_Row):
    task: Literal["classification"] = "classification"
    accuracy: float
    agreement: float = Field(description="Share of test inputs where the variant predicts what the teacher predicts.")
    ece: float = Field(description="Expected calibration error, 15 equal-width confidence bins (fraction).")
    ece_change: float = Field(description="ece - the teacher's ece.")
    newly_wrong: int = Field(description="Test inputs the teacher gets right and the variant gets wrong.")
    newly_right: int = Field(description="Test inputs the teacher gets wrong and the variant gets right.")
    both_wrong_changed: int = Field(description="Test inputs both get wrong, with different predictions.")
    worst_class: int | None = Field(description="The class that lost most accuracy; null when none lost any.")
    worst_class_drop: float = Field(description="Accuracy that class lost (fraction, >= 0).")
    per_class: list[ClassRow]
    confusion_changes: list[ConfusionCell] = Field(description="Off-diagonal confusion cells that changed most, largest |delta| first.")
    confusion_delta: list[list[int]] | None = Field(
        description="Variant confusion - teacher confusion (rows: actual, columns: predicted); null above 50 classes."
    )
    reliability: list[Bin]
    by_teacher_confidence: list[Bucket]
    flips: list[Flip] = Field(description="The most confident flips (by the variant's confidence), at most evaluate.changed_examples.")
    flip_grid: str | None = Field(description="PNG grid of those flips (image inputs only), relative to the project root.")


# ---------------------------------------------------------------------- regression


class TargetRow(_Row):
    target: int
    teacher_mse: float
    mse: float
    delta: float = Field(description="mse - teacher_mse.")


class QuantileRow(_Row):
    """Test inputs whose true target lies in one quantile bucket (lo, hi]."""

    target: int
    quantile: int = Field(description="1 = the lowest fifth of the target's values.")
    lo: float
    hi: float
    n: int
    teacher_mse: float | None
    mse: float | None
    delta: float | None


class Changed(_Row):
    index: int = Field(description="Row of the test split.")
    y: list[float]
    teacher: list[float]
    variant: list[float]
    change: float = Field(description="Euclidean distance between the variant's and the teacher's outputs.")
    teacher_error: float = Field(description="The teacher's squared error, averaged over targets.")
    error: float = Field(description="The variant's squared error, averaged over targets.")


class RegressionChanges(_Row):
    task: Literal["regression"] = "regression"
    mse: float
    mse_change: float = Field(description="mse - the teacher's mse.")
    agreement: float = Field(description="MSE between the variant's and the teacher's outputs.")
    per_target: list[TargetRow]
    by_quantile: list[QuantileRow]
    worst: list[Changed] = Field(description="Inputs whose outputs changed most, at most evaluate.changed_examples.")


VariantChanges = Annotated[ClassificationChanges | RegressionChanges, Field(discriminator="task")]


class ChangesReport(_Row):
    """Every variant against the teacher (the teacher's own entry has no changes)."""

    task: Literal["classification", "regression"]
    n_test: int
    reference: str = Field("teacher", description="The variant the others are compared with.")
    classes: list[str] | None = Field(
        None, description="Names of the classes 0..K-1 when the data's labels were not integers (data.task: classification)."
    )
    chance: Chance
    images: dict[str, str] = Field(default_factory=dict, description="Pictures written beside the report, by name, relative to the project root.")
    variants: dict[str, VariantChanges]

    def name(self, label: int) -> str:
        """How class ``label`` is shown: its name when the data has names, else the number."""
        return self.classes[label] if self.classes is not None and label < len(self.classes) else str(label)

    @classmethod
    def read(cls, root: Path) -> ChangesReport:
        """The changes.json of the project at ``root``."""
        return cls.model_validate(json.loads(StagePaths(Path(root)).changes_json.read_text(encoding="utf-8")))
