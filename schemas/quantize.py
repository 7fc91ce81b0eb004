"""params.yaml `quantize` section: one variant per `quantize.method`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.common import Finetune, Optimizer, Section, registry


class _QuantizeBase(Section):
    enabled: bool = Field(True, description="false passes the pruned model through unchanged.")


class DynamicQuant(_QuantizeBase):
    method: Literal["dynamic"] = Field(
        "dynamic", description="int8 weights for Linear layers, activations quantized at run time."
    )
    bits: Literal[8] = Field(8, description="Weight bit width (dynamic supports 8).")


class _Int8Base(_QuantizeBase):
    bits: int = Field(
        8, ge=2, le=8,
        description="Weight levels: 2**bits integer values per channel (or tensor), stored as int8; "
        "below 8 emulates low-bit weights on int8 kernels. Activations are always quint8 (7-bit range).",
    )
    per_channel: bool = Field(True, description="One weight scale per output channel (true) or per tensor (false).")


class StaticQuant(_Int8Base):
    method: Literal["static"] = Field(
        "static",
        description="int8 weights and activations, activation ranges calibrated on training batches; "
        "Conv/Linear+ReLU fused, BatchNorm folded."
    )
    calibration_batches: PositiveInt = Field(10, description="Training batches run through the observers.")
    calibration_batch_size: PositiveInt = Field(64, description="Size of each calibration batch.")
    observer: Literal["minmax", "histogram", "percentile"] = Field(
        "histogram",
        description="How activation ranges are chosen: minmax (full observed range), histogram (range minimising "
        "L2 quantization error) or percentile (clip the outer tails, see percentile).",
    )
    percentile: float = Field(
        99.99, gt=50, le=100, description="With observer: percentile, the share (in %) of activations kept inside the range."
    )


class QATQuant(_Int8Base):
    method: Literal["qat"] = Field(
        "qat",
        description="Quantization-aware training: fine-tune with fake-quantized weights and activations, then convert to int8."
    )
    finetune: Finetune = Field(
        default_factory=lambda: Finetune(epochs=2, optimizer=Optimizer(lr=0.005)),
        description="The fake-quantized fine-tuning (epochs ≥ 1).",
    )

    @model_validator(mode="after")
    def _trains(self):  # noqa: ANN202 - pydantic validator
        if self.finetune.epochs < 1:
            raise ValueError("qat needs finetune.epochs ≥ 1 (use method: static to quantize without training)")
        return self


Bits = Annotated[int, Field(ge=2, le=8)]


class KMeansQuant(_QuantizeBase):
    method: Literal["kmeans"] = Field(
        "kmeans",
        description="n-bit weight sharing (Deep Compression): each layer's weights replaced by one of 2**bits "
        "k-means centroids; stored as a codebook + uint8 indices."
    )
    bits: Bits | Literal["auto"] = Field(
        4,
        description="Bits per weight index (2..8): 2**bits shared values per layer. auto: each layer's width is chosen "
        "from a measured sensitivity (every layer clustered alone at each of `auto_bits`, validation quality measured) "
        "as the fewest index bits whose summed loss stays within `auto_budget`, then checked with all layers clustered "
        "together (the most sensitive layer gets a bit more until it fits).",
    )
    auto_bits: list[Bits] = Field(
        default_factory=lambda: [2, 3, 4, 5, 6, 7, 8], min_length=1, description="bits: auto: the widths tried per layer."
    )
    auto_budget: float = Field(
        0.002, ge=0,
        description="bits: auto: largest validation accuracy drop (fraction, 0.002 = 0.2 pp; for regression the MSE "
        "increase) that clustering may cost, measured before centroid fine-tuning.",
    )
    layer_bits: dict[str, Bits | None] = Field(
        default_factory=dict,
        description="Per-layer bits by layer-name pattern (fnmatch, e.g. {'net.0': 8, 'classifier.*': 5}); the first "
        "matching pattern wins, null keeps that layer float. Every other prunable weight (Linear/Conv, LSTM/GRU matrices, "
        "attention input projections) uses bits (fixed or auto).",
    )
    finetune: Finetune = Field(
        default_factory=lambda: Finetune(epochs=1),
        description="Centroid fine-tuning: weights stay tied to their cluster and each centroid takes its cluster's "
        "averaged gradient step (0 epochs = clustering only).",
    )


QuantizeParams = registry("method", "dynamic", DynamicQuant, StaticQuant, QATQuant, KMeansQuant)
