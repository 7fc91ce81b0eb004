"""Dynamic int8: int8 Linear weights, activations quantized per batch at run time.

We use ``torch.ao.quantization.quantize_dynamic`` rather than torchao's
``Int8DynamicActivationInt8WeightConfig``: on an AVX2 CPU torchao's version ran
about 25× slower than fp32 (it saves space only), while the fbgemm/x86 kernels
behind ``quantize_dynamic`` are faster than fp32 at large batches. torch 2.13 marks
``torch.ao.quantization`` deprecated; the warning (and its quantized-tensor twin) is
filtered at the call site below (``_compat.quiet_torch_ao``), for that reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from shrinkflow.artifacts import ModelHeader, Transform, register_transform
from shrinkflow.quantization._compat import quiet_torch_ao

KIND = "dynamic-int8"


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with quiet_torch_ao():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def quantize(model: nn.Module, params: Any, env: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize every nn.Linear of a float model to dynamic int8."""
    qmodel = _quantize_dynamic(copy.deepcopy(model).eval())
    return qmodel, {"kind": KIND}


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    return _quantize_dynamic(model.eval())


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy the dequantized int8 weights into the float architecture."""
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in float_model.named_modules():
            q = qmods.get(name)
            if isinstance(mod, nn.Linear) and q is not None and hasattr(q, "_packed_params"):
                mod.weight.copy_(q.weight().dequantize())
                if mod.bias is not None:
                    mod.bias.copy_(q.bias())
        qstate = qmodel.state_dict()
        for name, p in float_model.named_parameters():
            if name in qstate and isinstance(qstate[name], torch.Tensor) and not qstate[name].is_quantized:
                p.copy_(qstate[name])
    return float_model


register_transform(KIND, Transform(rebuild=_rebuild, to_float=_to_float))
