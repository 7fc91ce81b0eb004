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

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

from shrinkflow.artifacts import ModelHeader
from shrinkflow.errors import ParamsError
from shrinkflow.quantization._compat import quiet_torch_ao

_quiet = quiet_torch_ao


def weight_range(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit weights: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qconfig(bits: int = 8, per_channel: bool = True, observer: str = "histogram", qat: bool = False) -> QConfig:
    """The QConfig for x86: 8-bit activations (reduce_range), ``bits``-bit symmetric weights."""
    qmin, qmax = weight_range(bits)
    wq = dict(dtype=torch.qint8, quant_min=qmin, quant_max=qmax)
    # 7-bit activation range (what reduce_range=True did): x86 int8 kernels on CPUs
    # without VNNI saturate on the full 8-bit range.
    act = dict(dtype=torch.quint8, quant_min=0, quant_max=127)
    if qat:
        w_obs = (
            MovingAveragePerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_symmetric, **wq)
            if per_channel
            else MovingAverageMinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, **wq)
        )
        return QConfig(
            activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, **act),
            weight=FakeQuantize.with_args(
                observer=w_obs, quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
            ),
        )
    if observer == "minmax":
        a_obs = MinMaxObserver.with_args(**act)
    elif observer == "histogram":
        a_obs = HistogramObserver.with_args(**act)
    else:
        raise ParamsError(f"quantize.observer: unknown {observer!r}; use minmax, histogram or percentile")
    w_obs = (
        PerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_symmetric, **wq)
        if per_channel
        else MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, **wq)
    )
    return QConfig(activation=a_obs, weight=w_obs)


def _example(header_or_shape: ModelHeader | list[int]) -> tuple[torch.Tensor]:
    shape = header_or_shape.input_shape if isinstance(header_or_shape, ModelHeader) else header_or_shape
    return (torch.zeros(2, *shape),)


def prepare(model: nn.Module, example: tuple[torch.Tensor], cfg: QConfig, qat: bool = False) -> nn.Module:
    """Fuse, and insert observers (or fake-quantizers for QAT); returns a GraphModule."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    mapping = QConfigMapping().set_global(cfg)
    with _quiet():
        try:
            if qat:
                return prepare_qat_fx(model.train(), mapping, example)
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


def calibrate(prepared: nn.Module, X: torch.Tensor, batches: int, batch_size: int, seed: int = 0) -> None:
    """Run ``batches`` random training batches through the observers."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=gen)
    prepared.eval()
    with torch.no_grad():
        for b in range(batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) == 0:
                break
            prepared(X[idx])


def clamp_to_bits(qmodel: nn.Module, bits: int) -> nn.Module:
    """Clamp every int8 weight into the ``bits``-bit range, in place.

    torch.ao's convert rounds weights with the observer's scale but clamps only to
    the int8 range, so the extreme weight of a channel can land one step outside
    [-2**(bits-1), 2**(bits-1) - 1] (e.g. +8 at 4 bits): 2**bits + 1 levels.
    """
    if bits >= 8:
        return qmodel
    with quiet_torch_ao(), torch.no_grad():
        for q in _int8_modules(qmodel).values():
            w = q.weight()
            if w.is_quantized and hasattr(q, "set_weight_bias"):
                q.set_weight_bias(_on_grid(w.dequantize(), _grid(w), bits), q.bias())
    return qmodel


# ------------------------------------------------------------ transform hooks


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

