"""params.yaml `quantize` section: one variant per `quantize.method`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.common import Section, registry


class _QuantizeBase(Section):
    enabled: bool = Field(True, description="false passes the pruned model through unchanged.")


class DynamicQuant(_QuantizeBase):
    method: Literal["dynamic"] = Field(
        "dynamic", description="int8 weights for Linear layers, activations quantized at run time."
    )
    bits: Literal[8] = Field(8, description="Weight bit width (dynamic supports 8).")


QuantizeParams = registry("method", "dynamic", DynamicQuant)
