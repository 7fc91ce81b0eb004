"""params.yaml `evaluate` section: measurement settings and quality gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from schemas.common import Section


class Gates(Section):
    """Optional gates; teacher_above_chance is always on (see ``EvaluateParams.gates``)."""

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
    min_accuracy: float | None = Field(
        None, ge=0, le=1,
        description="Classification: smallest allowed test accuracy of every variant, the teacher included (fraction); "
        "one gate per variant (min_accuracy_<variant>); null = no gate.",
    )
    max_class_drop: float | None = Field(
        None, ge=0, le=1,
        description="Classification: largest accuracy any single class of the final model may lose vs the teacher "
        "(fraction, 0.05 = 5 pp), from reports/changes/changes.json; mind that a class with few test inputs moves in "
        "big steps (1 of 40 inputs = 2.5 pp); null = no gate.",
    )
    max_ece_increase: float | None = Field(
        None, ge=0, le=1,
        description="Classification: largest allowed increase of the final model's expected calibration error "
        "(15 bins) over the teacher's (fraction, 0.02 = 2 pp); null = no gate.",
    )


class EvaluateParams(Section):
    batch_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [1, 256], min_length=1, description="Batch sizes at which CPU latency is measured."
    )
    threads: PositiveInt = Field(1, description="torch.set_num_threads during latency measurement (stated in the report).")
    runtime: Literal["auto", "eager", "compile"] = Field(
        "auto",
        description="Runtime every variant's latency is measured in (the same for all, so speedups compare like with "
        "like): eager PyTorch, or compile = torch.compile (inductor, frozen weights, one compilation per batch size: "
        "the deployable form of a static/qat int8 graph, which eagerly runs slow reference kernels). auto = compile "
        "when a variant is static/qat int8, else eager.",
    )
    min_run_time: float = Field(
        0.3, gt=0, le=60, description="Seconds of timing per variant and batch size (torch.utils.benchmark blocked_autorange)."
    )
    gates: Gates = Field(
        default_factory=Gates,
        description="Quality gates checked on the final model (min_accuracy: on every variant); results in reports/evaluate.json. "
        "One gate is always on, teacher_above_chance: the teacher's test accuracy must beat the majority-class accuracy "
        "(regression: its MSE must stay under the variance of y) by 2.33 standard errors, since every drop measured "
        "against a useless teacher reads as zero.",
    )
    changed_examples: int = Field(
        16, ge=0, le=256,
        description="How many changed test inputs the 'what compression changed' report (reports/changes/) lists per "
        "variant: the most confident flips (classification; drawn as a PNG grid when inputs are images) or the "
        "inputs whose outputs changed most (regression). 0 = none.",
    )
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
