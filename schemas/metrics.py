"""``reports/metrics.json``: one row per variant, written by evaluate and read typed by everyone else.

Keys a row always has: ``accuracy`` (classification) or ``mse`` (regression),
``agreement``, ``size_bytes``, ``params``, ``nonzero_params``, ``sparsity``,
``layer_sparsity``, ``macs``, ``format``, ``path``, ``compression_ratio``, and for each
batch size *N* of ``evaluate.batch_sizes`` ``latency_ms_bN`` and ``speedup_bN``. The
latency keys stay flat so that ``dvc metrics diff`` shows them one by one.
Classification rows also have what compression changed against the teacher (details in
``reports/changes/changes.json``): ``ece``, ``newly_wrong``, ``newly_right``,
``worst_class_drop``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from schemas.paths import StagePaths

_PER_BATCH = re.compile(r"^(latency_ms|speedup)_b([1-9]\d*)$")
_CLASSIFICATION_ONLY = ("ece", "newly_wrong", "newly_right", "worst_class_drop")


class VariantMetrics(BaseModel):
    """One variant's row, measured from its file on disk."""

    model_config = ConfigDict(frozen=True, extra="allow")

    accuracy: float | None = Field(None, description="Test accuracy (classification), measured by loading the file.")
    mse: float | None = Field(None, description="Test mean squared error (regression).")
    agreement: float = Field(
        description="Classification: share of test inputs where the variant predicts what the teacher predicts; "
        "regression: MSE to the teacher's outputs."
    )
    size_bytes: int = Field(description="os.path.getsize of the variant's model file.")
    params: int
    nonzero_params: int
    sparsity: float = Field(description="Share of zeros among prunable weights.")
    layer_sparsity: dict[str, float]
    macs: int | None = Field(description="Multiply-accumulates per example; null when not countable.")
    format: str = Field(description="How the file stores the weights.")
    path: str = Field(description="The variant's file, relative to the project root.")
    compression_ratio: float = Field(description="Teacher file size / this file's size, same run.")
    runtime: str | None = Field(
        None, description="Where latency was measured (the same for every variant of a run): eager or compiled PyTorch."
    )
    ece: float | None = Field(None, description="Classification: expected calibration error, 15 confidence bins.")
    newly_wrong: int | None = Field(None, description="Classification: test inputs the teacher gets right and this variant wrong.")
    newly_right: int | None = Field(None, description="Classification: test inputs the teacher gets wrong and this variant right.")
    worst_class_drop: float | None = Field(
        None, description="Classification: the largest accuracy a single class lost vs the teacher (fraction, >= 0)."
    )

    @model_validator(mode="after")
    def _shape(self) -> VariantMetrics:
        if (self.accuracy is None) == (self.mse is None):
            raise ValueError("a row has exactly one of accuracy (classification) and mse (regression)")
        if self.mse is not None:
            extra = [k for k in _CLASSIFICATION_ONLY if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"a regression row (mse) has classification-only keys {extra}")
        for key, value in (self.model_extra or {}).items():
            if not _PER_BATCH.match(key) or not isinstance(value, int | float):
                raise ValueError(f"unexpected metrics key {key!r} (per batch size: latency_ms_bN, speedup_bN)")
        return self

    @property
    def quality_key(self) -> Literal["accuracy", "mse"]:
        return "accuracy" if self.accuracy is not None else "mse"

    @property
    def quality(self) -> float:
        return self.accuracy if self.accuracy is not None else self.mse  # type: ignore[return-value]

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(int(m.group(2)) for k in (self.model_extra or {}) if (m := _PER_BATCH.match(k)) and m.group(1) == "latency_ms")

    def latency_ms(self, batch: int) -> float:
        return float((self.model_extra or {})[f"latency_ms_b{batch}"])

    def speedup(self, batch: int) -> float:
        return float((self.model_extra or {})[f"speedup_b{batch}"])

    def get(self, key: str) -> float | int | str | None:
        """A column by its metrics.json key (tables and sweeps address columns by name)."""
        row = self.model_dump(exclude_none=True)
        return row.get(key)


class Metrics(RootModel[dict[str, VariantMetrics]]):
    """Every variant's row, by variant name (``teacher``, ``pruned``, ``quantized``, ``student``)."""

    def __getitem__(self, variant: str) -> VariantMetrics:
        return self.root[variant]

    def items(self):  # noqa: ANN201 - dict view
        return self.root.items()

    @property
    def quality_key(self) -> Literal["accuracy", "mse"]:
        return next(iter(self.root.values())).quality_key

    @classmethod
    def read(cls, root: Path) -> Metrics:
        """The metrics.json of the project at ``root``."""
        return cls.model_validate(json.loads(StagePaths(Path(root)).metrics.read_text(encoding="utf-8")))

    def as_json(self) -> dict:
        return {k: v.model_dump(exclude_none=True) for k, v in self.root.items()}
