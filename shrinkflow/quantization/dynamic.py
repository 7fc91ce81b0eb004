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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver, QConfig, default_dynamic_quant_observer

from schemas.quantize import DynamicQuant
from shrinkflow.artifacts import ModelHeader, Transform, register_transform
from shrinkflow.methods import Env
from shrinkflow.quantization._compat import quiet_torch_ao

#: The header transform, named after the method.
KIND = "dynamic"


#: Symmetric int8 range of the weights: ±127, so the largest weight is a code exactly
#: and weights already on the grid quantize to themselves (torch.ao's default weight
#: observer spans -128..127 and divides by 127.5, which shrinks the grid at every
#: requantization). The scale is max|w| / ((QMAX - -QMAX) / 2) = max|w| / QMAX.
QMAX = 127
_WEIGHT_OBSERVER = MinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-QMAX, quant_max=QMAX
)
_QCONFIG = QConfig(activation=default_dynamic_quant_observer, weight=_WEIGHT_OBSERVER)


def _fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to the int8 grid ``quantize_dynamic`` saves it on (the same observer)."""
    observer = _WEIGHT_OBSERVER().to(weight.device)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero_point), -QMAX, QMAX)


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with quiet_torch_ao():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: _QCONFIG}, dtype=torch.qint8)


def quantize_dynamic(model: nn.Module, header: ModelHeader, params: DynamicQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``dynamic``: every nn.Linear of a float model to int8 weights (activations quantized at run time)."""
    qmodel = _quantize_dynamic(copy.deepcopy(model).eval())
    return qmodel, header.with_transform(KIND)


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


def _constrain(float_model: nn.Module, entry: dict[str, Any]) -> Callable[[nn.Module], None]:
    """Keep training on the int8 grid, with latent float weights (straight-through estimator).

    After each optimizer step the step's change is added to a latent float copy of
    each Linear weight, and the weight is set to the latent copy fake-quantized. The
    forward and backward passes thus see the int8 weights, while updates smaller than
    half a quantization step still accumulate (rounding the weights themselves after
    each step would discard them). ``reapply`` then quantizes weights that are
    already on the grid, so what was trained is what is saved.
    torch.ao's dynamic QAT modules would need a second prepare/convert path; this
    hook fits the ``after_step`` contract every training loop here already has.
    """
    names = [n for n, m in float_model.named_modules() if isinstance(m, nn.Linear)]
    # The weights come from the int8 model (``_to_float``): on the grid already.
    latent = {n: float_model.get_submodule(n).weight.detach().clone() for n in names}
    on_grid = {n: w.clone() for n, w in latent.items()}

    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for n in names:
                weight = model.get_submodule(n).weight
                if latent[n].device != weight.device:
                    latent[n], on_grid[n] = latent[n].to(weight.device), on_grid[n].to(weight.device)
                latent[n] += weight - on_grid[n]
                on_grid[n] = _fake_quantize(latent[n])
                weight.copy_(on_grid[n])

    return after_step


register_transform(KIND, Transform(rebuild=_rebuild, to_float=_to_float, constrain=_constrain))
