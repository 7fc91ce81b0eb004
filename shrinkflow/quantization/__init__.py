"""Quantization methods: one typed entry point per ``quantize.method``, registered in ``QUANTIZERS``.

Each entry point is ``(model, header, params, env) -> (quantized model, header)``
(``shrinkflow.methods``); the header gains the transform, named after the method,
that rebuilds the quantized model on load (see ``shrinkflow.artifacts``). Methods and
the PyTorch path behind each:

- ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 Linear, LSTM and GRU weights).
- ``static`` / ``qat``: ``torch.export`` + pt2e (torchao), run compiled (``static.runtime``);
  files of the former FX path still load (``static_fx.py``).
- ``kmeans``: per-layer k-means weight sharing (codebook + uint8 indices).
"""

from __future__ import annotations

from schemas.params import QuantizeParams
from shrinkflow.methods import Method
from shrinkflow.quantization.dynamic import quantize_dynamic
from shrinkflow.quantization.kmeans import codebooks, quantize_kmeans
from shrinkflow.quantization.static import quantize_qat, quantize_static

#: ``quantize.method`` → entry point (model, header, params, env) -> (quantized model, header).
QUANTIZERS: dict[str, Method[QuantizeParams]] = {
    "dynamic": quantize_dynamic,
    "static": quantize_static,
    "qat": quantize_qat,
    "kmeans": quantize_kmeans,
}

__all__ = ["QUANTIZERS", "codebooks"]
