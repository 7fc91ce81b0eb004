"""params.yaml `prune` section: one variant per `prune.method`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.common import Finetune, Section, registry


class _PruneBase(Section):
    enabled: bool = Field(True, description="false passes the teacher through unchanged.")
    sparsity: float = Field(0.8, gt=0, lt=1, description="Fraction of prunable weights (Linear/Conv weights, not biases) set to zero.")
    finetune: Finetune = Field(default_factory=Finetune, description="Fine-tuning after pruning; pruned weights stay exactly zero.")


class MagnitudePrune(_PruneBase):
    method: Literal["magnitude"] = Field("magnitude", description="Remove the weights of smallest absolute value.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one threshold across all layers; layer: each layer pruned to ``sparsity``."
    )


PruneParams = registry("method", "magnitude", MagnitudePrune)
