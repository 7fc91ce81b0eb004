"""Static int8 (calibrated) and quantization-aware training (QAT): int8 weights *and* activations.

Which PyTorch path, and why
---------------------------
We use FX graph mode (``torch.ao.quantization.quantize_fx``: ``prepare_fx`` /
``prepare_qat_fx`` → calibrate or train → ``convert_fx``), not the pt2e flow
(``torchao.quantization.pt2e``) that torch 2.13 recommends instead:

- a model converted by pt2e runs reference (dequantize → fp32 op → quantize)
  ops in eager mode and is *slower* than fp32 unless ``torch.compile``d with
  freezing, whereas FX convert produces modules backed by the fbgemm/x86 int8
  kernels, fast eagerly;
- FX's result fits the shrinkflow model file as it is: a plain state dict of int8
  tensors plus scales/zero points (loaded with ``weights_only=True``), rebuilt on
  load by replaying prepare → convert on the float architecture. A pt2e model
  saves as a ``.pt2`` program whose activation scales are baked into the graph
  code, so it cannot be rebuilt from the float model plus a state dict.

torch 2.13 warns on every call that ``torch.ao.quantization`` is deprecated; the
warning is filtered at the call sites below (``_compat.quiet_torch_ao``) for that reason.

What FX does for us: fuses Conv/Linear + ReLU into one int8 op, folds BatchNorm
into the preceding convolution, inserts observers, and converts.

Low bit widths: ``bits`` < 8 restricts the weight integer range (e.g. [-8, 7] for
4 bits) while keeping int8 storage and kernels — the setting in which QAT's
advantage over calibration shows. Activations are quint8 restricted to [0, 127]
(what ``reduce_range`` did), so the x86 kernels cannot saturate on CPUs without VNNI.
Weights use symmetric quantization (zero point 0), so pruned zeros stay exactly 0.
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

from schemas.quantize import QATQuant, StaticQuant
from shrinkflow.artifacts import ModelHeader, Transform, keep_constraints, register_transform
from shrinkflow.errors import ParamsError
from shrinkflow.methods import Env
from shrinkflow.quantization._compat import quiet_torch_ao

#: The header transforms, named after the methods (both rebuild the same int8 modules).
KIND, QAT_KIND = "static", "qat"


_quiet = quiet_torch_ao


class PercentileObserver(HistogramObserver):
    """Histogram observer whose range clips the ``percentile`` tails instead of minimising L2 error."""

    def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        bin_width = (self.max_val - self.min_val) / self.bins
        cdf = torch.cumsum(self.histogram, dim=0)
        total = cdf[-1]
        tail = (100.0 - self.percentile) / 100.0
        lo = int(torch.searchsorted(cdf, tail * total))
        hi = int(torch.searchsorted(cdf, (1.0 - tail) * total))
        return self.min_val + bin_width * lo, self.min_val + bin_width * min(hi + 1, self.bins)


def weight_range(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit weights: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qconfig(bits: int = 8, per_channel: bool = True, observer: str = "histogram", percentile: float = 99.99,
            qat: bool = False) -> QConfig:
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
    elif observer == "percentile":
        a_obs = PercentileObserver.with_args(percentile=percentile, **act)
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


def _with_entry(header: ModelHeader, kind: str, params: StaticQuant | QATQuant, qmodel: nn.Module) -> ModelHeader:
    # Activation ranges go into the header so that ``reapply`` (after distillation)
    # re-quantizes with the calibrated ranges, without calibration data.
    return header.with_transform(kind, bits=params.bits, per_channel=params.per_channel, activations=activation_qparams(qmodel))


def quantize_static(model: nn.Module, header: ModelHeader, params: StaticQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``static``: calibrated post-training int8, weights and activations (``model`` is not modified)."""
    X, _ = env.data("quantize.method static (calibration)").tensors("train")
    cfg = qconfig(params.bits, params.per_channel, params.observer, params.percentile)
    prepared = prepare(copy.deepcopy(model), _example(list(X.shape[1:])), cfg)
    calibrate(prepared, X, params.calibration_batches, params.calibration_batch_size, env.seed)
    qmodel = clamp_to_bits(convert(prepared), params.bits)
    return qmodel, _with_entry(header, KIND, params, qmodel)


def quantize_qat(model: nn.Module, header: ModelHeader, params: QATQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``qat``: fine-tune with fake-quantized weights and activations, then convert to int8."""
    X, _ = env.data("quantize.method qat").tensors("train")
    cfg = qconfig(params.bits, params.per_channel, qat=True)
    prepared = prepare(copy.deepcopy(model), _example(list(X.shape[1:])), cfg, qat=True)
    # Fake-quantized weights of zero stay zero (symmetric), but training would move
    # the float zeros: keep them pruned.
    after_step = keep_constraints(prepared, header)
    # fake-quant observers are placed on CPU by prepare
    finetune = dataclasses.replace(env, device=torch.device("cpu")).finetuner(params.finetune, "quantize.finetune")
    with _quiet():
        finetune(prepared, params.finetune.epochs, after_step)
    qmodel = clamp_to_bits(convert(prepared), params.bits)
    return qmodel, _with_entry(header, QAT_KIND, params, qmodel)


# ------------------------------------------------------------ transform hooks


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
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


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
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


def _reapply(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    """int8 again after float training, on the same quantization as before.

    Activations keep their calibrated ranges (stored in the entry). Weights go back
    onto the grids they had when ``to_float`` made this float model (so an
    untrained round trip is exact); weights without a stored grid are quantized
    with fresh per-channel ranges.
    """
    grids = model.__dict__.get(_GRIDS, {})
    floats = {n: (m.weight.detach().clone(), m.bias.detach().clone() if getattr(m, "bias", None) is not None else None)
              for n, m in model.named_modules() if n in grids}
    qmodel = _rebuild(model, entry, header)
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


for _kind in (KIND, QAT_KIND):
    register_transform(_kind, Transform(rebuild=_rebuild, to_float=_to_float, reapply=_reapply))
