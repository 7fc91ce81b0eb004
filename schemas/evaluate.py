"""params.yaml `evaluate` section: measurement settings and quality gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from schemas.common import Section


class Gates(Section):
    max_accuracy_drop: float | None = Field(
        0.05, ge=0, le=1, description="Largest allowed accuracy drop of the final model vs the teacher (fraction, 0.01 = 1 pp); null = no gate."
    )
    max_mse_ratio: float | None = Field(
        None, gt=0, description="Regression: largest allowed final-model MSE as a multiple of the teacher's; null = no gate."
    )
    min_compression_ratio: float | None = Field(
        None, gt=0, description="Smallest allowed teacher-size / final-size ratio, from the files on disk; null = no gate."
    )
    max_latency_ms: float | None = Field(
        None, gt=0,
        description="Largest allowed median CPU latency (ms) of the final model at the smallest of evaluate.batch_sizes; null = no gate.",
    )


class EvaluateParams(Section):
    batch_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [1, 256], min_length=1, description="Batch sizes at which CPU latency is measured."
    )
    threads: PositiveInt = Field(1, description="torch.set_num_threads during latency measurement (stated in the report).")
    min_run_time: float = Field(
        0.3, gt=0, le=60, description="Seconds of timing per variant and batch size (torch.utils.benchmark blocked_autorange)."
    )
    gates: Gates = Field(default_factory=Gates, description="Quality gates checked on the final model; results in reports/evaluate.json.")
    pack: Literal["student", "quantized", "pruned", "teacher", "none"] = Field(
        "student",
        description=(
            "Variant written as a packed Deep Compression file (models/evaluate/<variant>.sfz: sparse positions, "
            "shared-weight indices, Huffman coding; see docs/packing.md). That file is the variant's size_bytes and "
            "its quality is measured by loading it; none = report the .pt files only."
        ),
    )
    pack_precision: Literal["predictions", "exact"] = Field(
        "predictions",
        description=(
            "predictions: biases, codebooks and other float values of the packed file are stored as float16 wherever "
            "the predicted class of every validation example stays the same (checked tensor by tensor; regression "
            "models are always exact); exact: every value bit for bit, the loaded model computes exactly what the "
            ".pt variant computes."
        ),
    )
