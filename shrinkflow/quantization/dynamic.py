"""Dynamic int8: int8 Linear, LSTM and GRU weights, activations quantized per batch at run time.

We use ``torch.ao.quantization.quantize_dynamic`` rather than torchao's
``Int8DynamicActivationInt8WeightConfig``: on an AVX2 CPU torchao's version ran
about 25× slower than fp32 (it saves space only), while the fbgemm/x86 kernels
behind ``quantize_dynamic`` are faster than fp32 at large batches. torch 2.13 marks
``torch.ao.quantization`` deprecated; the warning (and its quantized-tensor twin) is
filtered at the call site below (``_compat.quiet_torch_ao``), for that reason.

LSTM and GRU layers become torch.ao's dynamic quantized LSTM/GRU (int8 input and
recurrent matrices, fbgemm kernels). Their state dict holds TorchScript objects
(packed cell parameters) that ``torch.load(weights_only=True)`` refuses, so the
layers here save their int8 weights and float biases as plain tensors instead
(``_rnn_state`` / ``_rnn_load``) and repack them on load.
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
from shrinkflow.errors import ParamsError
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


#: Dynamic quantized recurrent layers of torch.ao.
_QRNN = (torch.ao.nn.quantized.dynamic.LSTM, torch.ao.nn.quantized.dynamic.GRU)
#: Float layers dynamic int8 quantizes, and the weights of each it quantizes.
QUANTIZED_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


def _rnn_names(mod: nn.Module) -> list[str]:
    suffixes = ["", "_reverse"] if mod.bidirectional else [""]
    return [f"{kind}_{g}_l{i}{s}" for i in range(mod.num_layers) for s in suffixes for kind in ("weight", "bias") for g in ("ih", "hh")]


def _rnn_state(mod: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: int8 weights (quantized tensors) and float biases instead of packed TorchScript objects."""
    for k in [k for k in state if k.startswith(prefix + "_all_weight_values.")]:
        del state[k]
    with quiet_torch_ao():
        for group in (mod.get_weight(), mod.get_bias()):
            state.update({prefix + k: v.detach() for k, v in group.items()})


def _rnn_load(mod: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: repack the plain tensors ``_rnn_state`` wrote."""
    names = _rnn_names(mod)
    if all(prefix + n in state for n in names):
        with quiet_torch_ao():
            mod.set_weight_bias({n: state.pop(prefix + n) for n in names})
        for i, packed in enumerate(mod._all_weight_values):
            state[f"{prefix}_all_weight_values.{i}.param"] = packed.param


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with quiet_torch_ao():
        qmodel = torch.ao.quantization.quantize_dynamic(model, dict.fromkeys(QUANTIZED_TYPES, _QCONFIG), dtype=torch.qint8)
    for mod in qmodel.modules():
        if isinstance(mod, _QRNN):
            mod.register_state_dict_post_hook(_rnn_state)
            mod.register_load_state_dict_pre_hook(_rnn_load)
    return qmodel


def refusal(model: nn.Module) -> str | None:
    """Why ``dynamic`` cannot quantize ``model`` (None when it can): it has no Linear, LSTM or GRU layer,
    or an ``nn.TransformerEncoderLayer``, whose fused inference path reads its Linear weights as
    tensors (an int8 dynamic Linear's weight is a method: inference would fail)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            return (
                f"quantize.method dynamic: {name} (nn.TransformerEncoderLayer): its fused inference path cannot run "
                "int8 dynamic Linear layers; use quantize.method static, qat or kmeans"
            )
    if _quantized_weights(model):
        return None
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)})
    return (
        f"quantize.method dynamic: int8 dynamic quantization covers Linear, LSTM and GRU layers and this model has none"
        f"{' (its layers are ' + ', '.join(kinds) + ')' if kinds else ''}; use quantize.method static or kmeans"
    )


def quantize_dynamic(model: nn.Module, header: ModelHeader, params: DynamicQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``dynamic``: every nn.Linear, nn.LSTM and nn.GRU of a float model to int8 weights (activations quantized at run time)."""
    why = refusal(model)
    if why:
        raise ParamsError(why)
    qmodel = _quantize_dynamic(copy.deepcopy(model).eval())
    return qmodel, header.with_transform(KIND)


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    return _quantize_dynamic(model.eval())


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy the dequantized int8 weights into the float architecture."""
    qmods = dict(qmodel.named_modules())
    with quiet_torch_ao(), torch.no_grad():
        for name, mod in float_model.named_modules():
            q = qmods.get(name)
            if isinstance(mod, nn.Linear) and q is not None and hasattr(q, "_packed_params"):
                mod.weight.copy_(q.weight().dequantize())
                if mod.bias is not None:
                    mod.bias.copy_(q.bias())
            elif isinstance(q, _QRNN):
                for group in (q.get_weight(), q.get_bias()):
                    for n, t in group.items():
                        getattr(mod, n).copy_(t.dequantize() if t.is_quantized else t)
        qstate = qmodel.state_dict()
        for name, p in float_model.named_parameters():
            if name in qstate and isinstance(qstate[name], torch.Tensor) and not qstate[name].is_quantized:
                p.copy_(qstate[name])
    return float_model


def _quantized_weights(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, weight attribute) of every weight dynamic int8 stores as int8 (``quantize_dynamic``
    matches exact types: attention's ``out_proj``, a Linear subclass, stays float)."""
    out = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            out.append((name, "weight"))
        elif type(mod) in (nn.LSTM, nn.GRU):
            out += [(name, n) for n in _rnn_names(mod) if n.startswith("weight_")]
    return out


def _constrain(float_model: nn.Module, entry: dict[str, Any]) -> Callable[[nn.Module], None]:
    """Keep training on the int8 grid, with latent float weights (straight-through estimator).

    After each optimizer step the step's change is added to a latent float copy of
    each int8 weight (Linear, LSTM/GRU matrices), and the weight is set to the latent copy fake-quantized. The
    forward and backward passes thus see the int8 weights, while updates smaller than
    half a quantization step still accumulate (rounding the weights themselves after
    each step would discard them). ``reapply`` then quantizes weights that are
    already on the grid, so what was trained is what is saved.
    torch.ao's dynamic QAT modules would need a second prepare/convert path; this
    hook fits the ``after_step`` contract every training loop here already has.
    """
    names = _quantized_weights(float_model)
    # The weights come from the int8 model (``_to_float``): on the grid already.
    latent = {n: getattr(float_model.get_submodule(n[0]), n[1]).detach().clone() for n in names}
    on_grid = {n: w.clone() for n, w in latent.items()}

    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for n in names:
                weight = getattr(model.get_submodule(n[0]), n[1])
                if latent[n].device != weight.device:
                    latent[n], on_grid[n] = latent[n].to(weight.device), on_grid[n].to(weight.device)
                latent[n] += weight - on_grid[n]
                on_grid[n] = _fake_quantize(latent[n])
                weight.copy_(on_grid[n])

    return after_step


register_transform(KIND, Transform(rebuild=_rebuild, to_float=_to_float, constrain=_constrain))
