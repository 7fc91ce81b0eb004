"""Loading static/QAT int8 files written by shrinkflow 0.1 (FX graph mode, ``torch.ao.quantization``).

Until 0.1, ``static`` and ``qat`` went through FX graph mode (``prepare_fx`` →
calibrate/train → ``convert_fx``), whose modules run fbgemm/x86 int8 kernels. FX
symbolic tracing fails on forwards that branch on their input's shape, and torch
2.13 deprecates ``torch.ao.quantization``; new files go through ``torch.export`` +
pt2e (``static.py``). This module keeps what an FX file needs to load, to pack and
to keep training as a compressed student: rebuilding the int8 modules by replaying
prepare → convert on the float architecture, the float form of the int8 weights,
and re-quantizing onto the same grids. A transform entry of kind ``static``/``qat``
without ``"graph": "pt2e"`` is such a file.

FX's result is a plain state dict of int8 tensors plus scales/zero points (loaded
with ``weights_only=True``); activation scales are in the state dict too, and in
the entry (``activations``) for re-quantizing after training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
)

from shrinkflow.artifacts import ModelHeader
from shrinkflow.errors import ParamsError
from shrinkflow.quantization._compat import quiet_torch_ao

_quiet = quiet_torch_ao


def weight_range(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit weights: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qconfig(bits: int = 8, per_channel: bool = True, observer: str = "minmax") -> QConfig:
    """The QConfig 0.1 used on x86: 7-bit activations (reduce_range), ``bits``-bit symmetric weights.

    Rebuilding needs only its shapes and dtypes (the file's scales replace the
    observers'); ``histogram`` calibrates like 0.1 did (tests write such files).
    """
    qmin, qmax = weight_range(bits)
    wq = dict(dtype=torch.qint8, quant_min=qmin, quant_max=qmax)
    # 7-bit activation range (what reduce_range=True did): x86 int8 kernels on CPUs
    # without VNNI saturate on the full 8-bit range.
    act = dict(dtype=torch.quint8, quant_min=0, quant_max=127)
    a_obs = (HistogramObserver if observer == "histogram" else MinMaxObserver).with_args(**act)
    w_obs = (
        PerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_symmetric, **wq)
        if per_channel
        else MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, **wq)
    )
    return QConfig(activation=a_obs, weight=w_obs)


def _example(header_or_shape: ModelHeader | list[int]) -> tuple[torch.Tensor]:
    shape = header_or_shape.input_shape if isinstance(header_or_shape, ModelHeader) else header_or_shape
    return (torch.zeros(2, *shape),)


def prepare(model: nn.Module, example: tuple[torch.Tensor], cfg: QConfig) -> nn.Module:
    """Fuse, and insert observers; returns a GraphModule."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = QConfigMapping().set_global(cfg)
    with _quiet():
        try:
            return prepare_fx(model.eval(), mapping, example)
        except Exception as exc:  # symbolic tracing fails on data-dependent control flow
            raise ParamsError(
                f"quantize.method static/qat needs a model torch.fx can trace ({type(exc).__name__}: {exc}); "
                "use quantize.method dynamic or kmeans for this model"
            ) from exc


def convert(prepared: nn.Module) -> nn.Module:
    """Replace observed modules by int8 ones (fbgemm/x86 kernels)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(prepared.eval())


def rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    """The int8 modules of an FX file's entry, with uncalibrated scales (the file's replace them)."""
    # Observers do not matter here: the file's scales and int8 weights replace them.
    cfg = qconfig(entry["bits"], entry["per_channel"], "minmax")
    return convert(prepare(model, _example(header), cfg))


def _int8_modules(qmodel: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in qmodel.named_modules() if callable(getattr(m, "weight", None))}


#: Attribute of a float model from ``_to_float`` holding the int8 weight grids it came from.
_GRIDS = "_shrinkflow_int8_weight_grids"


def _grid(w: torch.Tensor) -> dict[str, Any]:
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return {"scale": w.q_per_channel_scales().clone(), "zero_point": w.q_per_channel_zero_points().clone(),
                "axis": w.q_per_channel_axis()}
    return {"scale": w.q_scale(), "zero_point": w.q_zero_point(), "axis": None}


def _on_grid(w: torch.Tensor, grid: dict[str, Any], bits: int) -> torch.Tensor:
    """``w`` quantized onto a stored grid, as a qint8 tensor; integers clamped to ``bits``."""
    qmin, qmax = weight_range(bits)
    if grid["axis"] is None:
        q = torch.clamp(torch.round(w / grid["scale"]) + grid["zero_point"], qmin, qmax).to(torch.int8)
        return torch._make_per_tensor_quantized_tensor(q, grid["scale"], grid["zero_point"])
    shape = [1] * w.dim()
    shape[grid["axis"]] = -1
    scale = grid["scale"].reshape(shape).to(w.dtype)
    zp = grid["zero_point"].reshape(shape).to(w.dtype)
    q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax).to(torch.int8)
    return torch._make_per_channel_quantized_tensor(q, grid["scale"], grid["zero_point"], grid["axis"])


def to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy the dequantized int8 weights (and float biases) into the float architecture.

    FX keeps module names (a fused Linear+ReLU is named after the Linear), so names
    match. BatchNorm that FX folded into a convolution is set to the identity, since
    the copied weights already hold it. The weight grids (scales) are kept on the
    float model so that ``reapply`` puts trained weights back on the same grids.
    """
    qmods = _int8_modules(qmodel)
    grids: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, mod in float_model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0 - mod.eps)
                if mod.affine:
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
            q = qmods.get(name)
            if q is None or not hasattr(mod, "weight"):
                continue
            w = q.weight()
            if w.is_quantized:
                grids[name] = _grid(w)
            mod.weight.copy_(w.dequantize() if w.is_quantized else w)
            b = q.bias() if callable(getattr(q, "bias", None)) else getattr(q, "bias", None)
            if b is not None and mod.bias is not None:
                mod.bias.copy_(b)
    float_model.__dict__[_GRIDS] = grids
    return float_model


def activation_qparams(qmodel: nn.Module) -> dict[str, float]:
    """The activation scales / zero points of a converted model (scalar entries of its state dict)."""
    out = {}
    for key, v in qmodel.state_dict().items():
        if isinstance(v, torch.Tensor) and not v.is_quantized and v.numel() == 1 and (
            key.endswith(("scale", "zero_point")) or "_scale_" in key or "_zero_point_" in key
        ):
            out[key] = v.item()
    return out


def reapply(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    """int8 again after float training, on the same quantization as before.

    Activations keep their calibrated ranges (stored in the entry). Weights go back
    onto the grids they had when ``to_float`` made this float model (so an
    untrained round trip is exact); weights without a stored grid are quantized
    with fresh per-channel ranges.
    """
    grids = model.__dict__.get(_GRIDS, {})
    floats = {n: (m.weight.detach().clone(), m.bias.detach().clone() if getattr(m, "bias", None) is not None else None)
              for n, m in model.named_modules() if n in grids}
    qmodel = rebuild(model, entry, header)
    state = qmodel.state_dict()
    for key, value in entry.get("activations", {}).items():
        state[key] = torch.tensor(value, dtype=state[key].dtype)
    qmodel.load_state_dict(state)
    qmods = _int8_modules(qmodel)
    with quiet_torch_ao():
        for name, (w, b) in floats.items():
            if name in qmods and hasattr(qmods[name], "set_weight_bias"):
                qmods[name].set_weight_bias(_on_grid(w, grids[name], entry["bits"]), b)
    return qmodel

