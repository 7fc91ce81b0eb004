"""Quantization methods: one handler per ``quantize.method``.

Each handler takes a float model and returns the quantized model and the header
transform that rebuilds it on load (see ``shrinkflow.artifacts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shrinkflow.quantization import dynamic

#: method name → handler(model, params) -> (quantized model, transform entry)
QUANTIZERS: dict[str, Callable[[nn.Module, Any], tuple[nn.Module, dict[str, Any]]]] = {
    "dynamic": dynamic.quantize,
}

__all__ = ["QUANTIZERS"]
