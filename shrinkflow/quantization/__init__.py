"""Quantization methods: one handler per ``quantize.method``.

Each handler takes a float model, its params section and a :class:`QuantEnv`, and
returns the quantized model and the header transform entry that rebuilds it on load
(see ``shrinkflow.artifacts``). Methods and the PyTorch path behind each:

- ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 Linear weights).
- ``static`` / ``qat``: FX graph mode int8 (``static.py`` says why not pt2e).
- ``kmeans``: per-layer k-means weight sharing (codebook + uint8 indices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrinkflow.artifacts import ModelHeader
from shrinkflow.data import Splits
from shrinkflow.quantization import dynamic, kmeans, static
from shrinkflow.quantization.kmeans import codebooks


@dataclass(frozen=True)
class QuantEnv:
    """What a handler may need besides the model and its params."""

    header: ModelHeader
    splits: Splits | None = None
    seed: int = 0
    device: torch.device = torch.device("cpu")


#: method name → handler(model, params, env) -> (quantized model, transform entry)
QUANTIZERS: dict[str, Callable[[nn.Module, Any, QuantEnv | None], tuple[nn.Module, dict[str, Any]]]] = {
    "dynamic": dynamic.quantize,
    "static": static.quantize_static,
    "qat": static.quantize_qat,
    "kmeans": kmeans.quantize,
}

__all__ = ["QUANTIZERS", "QuantEnv", "codebooks"]
