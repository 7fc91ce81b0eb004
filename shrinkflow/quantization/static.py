"""Static int8 (calibrated) and quantization-aware training (QAT), through ``torch.export`` + pt2e.

The maintained PyTorch path (torch.ao's eager and FX APIs are deprecated in torch
2.13): ``torch.export.export`` captures the model as an ATen graph, so forwards
that branch on their input's shape or rank (``if x.dim() == 2: ...``) work, where
FX symbolic tracing failed; torchao's ``prepare_pt2e`` with ``X86InductorQuantizer``
folds BatchNorm into the convolutions and inserts observers; calibration (or QAT
fine-tuning) sets the ranges; ``convert_pt2e`` leaves int8 weights (``_frozen_param*``),
their per-channel scales (``_scale_*``) and quantize/dequantize nodes around every
Conv/Linear. ``torch.compile`` (inductor, weights frozen) turns that graph into
oneDNN int8 kernels: the runtime a user deploys (``measure.compiled``). Run eagerly it is a
reference implementation, slower than fp32.

Saving without pickling a graph
-------------------------------
A converted graph bakes its activation scales into the graph's code, and a pickled
graph would run code on load. So the model file keeps only data: the graph's int8
weights, scales and float biases (its state dict, ``weights_only``-safe), and the
header entry keeps every per-tensor scale and zero point, by observer name
(``activations``). Loading rebuilds the same graph: the float architecture from
the spec, exported and prepared exactly as when it was quantized, every observer
fixed to the stored values, converted, and the state dict loaded (``_rebuild``).

QAT fine-tunes the exported graph with fake-quantized weights and activations
(``prepare_qat_pt2e``), copies the trained weights back into the float model, and
converts that like ``static`` (calibrated activations): a QAT file is rebuilt
exactly like a static one.

The x86 int8 kernels of CPUs without VNNI saturate on 8-bit activations, so
activations use the 7-bit range (``reduce_range``). Weights are symmetric (zero
point 0), so pruned zeros stay exactly 0; ``bits`` < 8 narrows the weight integers
while keeping int8 storage and kernels. LSTM/GRU layers have no int8 pattern in
``X86InductorQuantizer`` (they would stay fp32): those models are refused, with
``dynamic`` named instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from schemas.quantize import QATQuant, StaticQuant
from shrinkflow.artifacts import ModelHeader, Transform, register_transform
from shrinkflow.errors import ParamsError
from shrinkflow.masks import RECURRENT, masks_from_zeros
from shrinkflow.methods import Env
from shrinkflow.quantization import static_fx
from shrinkflow.quantization._compat import quiet_torch_ao
from shrinkflow.quantization.static_fx import weight_range

#: The header transforms, named after the methods (both rebuild the same int8 graph).
KIND, QAT_KIND = "static", "qat"
#: ``entry["graph"]`` of files written through pt2e (FX files of shrinkflow 0.1 have none).
GRAPH = "pt2e"
#: Name prefix pt2e gives its observer modules.
_OBSERVER = "activation_post_process_"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # torchao's CUDA-only extensions, export's notes on deprecated internals: nothing a user can act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(_C_mxfp8|_C_cutlass|is an Enum subclass).*")
        yield


def _pt2e() -> Any:
    """torchao's pt2e modules (imported on first use: importing torchao costs seconds)."""
    import os

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA-only extensions
    with _quiet():
        import torchao.quantization.pt2e as pt2e
        import torchao.quantization.pt2e.quantize_pt2e as flow
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    return pt2e, flow, xiq


def _percentile_observer() -> type:
    pt2e, _, _ = _pt2e()

    class PercentileObserver(pt2e.HistogramObserver):
        """Histogram observer whose range clips the ``percentile`` tails instead of minimising L2 error."""

        def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = percentile

        def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
            bin_width = (self.max_val - self.min_val) / self.bins
            cdf = torch.cumsum(self.histogram, dim=0)
            tail = (100.0 - self.percentile) / 100.0
            lo = int(torch.searchsorted(cdf, tail * cdf[-1]))
            hi = int(torch.searchsorted(cdf, (1.0 - tail) * cdf[-1]))
            return self.min_val + bin_width * lo, self.min_val + bin_width * min(hi + 1, self.bins)

    return PercentileObserver


def quantizer(bits: int = 8, per_channel: bool = True, observer: str = "histogram", percentile: float = 99.99,
              qat: bool = False) -> Any:
    """``X86InductorQuantizer`` for 7-bit activations and ``bits``-bit symmetric weights.

    Args:
        observer: how calibration picks activation ranges: ``minmax``, ``histogram``
            (least L2 error) or ``percentile`` (clips ``percentile`` tails).
        qat: fake-quantize (moving-average ranges) for quantization-aware training.
    """
    pt2e, _, xiq = _pt2e()
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    base = xiq.get_default_x86_inductor_quantization_config(is_qat=qat, reduce_range=True)
    act = base.input_activation
    if not qat:
        obs = {
            "minmax": pt2e.MinMaxObserver.with_args(eps=2**-12),
            "histogram": pt2e.HistogramObserver.with_args(eps=2**-12),
            "percentile": _percentile_observer().with_args(percentile=percentile, eps=2**-12),
        }
        if observer not in obs:
            raise ParamsError(f"quantize.observer: unknown {observer!r}; use minmax, histogram or percentile")
        act = dataclasses.replace(act, observer_or_fake_quant_ctr=obs[observer])
    qmin, qmax = weight_range(bits)
    if qat:
        w_obs = pt2e.FusedMovingAvgObsFakeQuantize.with_args(
            observer=pt2e.MovingAveragePerChannelMinMaxObserver if per_channel else pt2e.MovingAverageMinMaxObserver, eps=2**-12
        )
    else:
        w_obs = (pt2e.PerChannelMinMaxObserver if per_channel else pt2e.MinMaxObserver).with_args(eps=2**-12)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=qmin, quant_max=qmax,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None, is_dynamic=False, observer_or_fake_quant_ctr=w_obs,
    )
    return xiq.X86InductorQuantizer().set_global(QuantizationConfig(act, act, weight, None, qat))


# ------------------------------------------------------------------ capture


def refusal(model: nn.Module, method: str) -> str | None:
    """Why ``static``/``qat`` cannot quantize ``model`` (None when it can): recurrent layers, which
    pt2e's x86 quantizer leaves in fp32."""
    rnns = [f"{n or 'model'} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, RECURRENT)]
    if rnns:
        return (
            f"quantize.method {method}: {', '.join(rnns)}: recurrent layers have no static int8 kernel in pt2e "
            "(X86InductorQuantizer quantizes Conv/Linear, so their weights would stay fp32); use quantize.method "
            "dynamic (int8 LSTM/GRU and Linear weights) or kmeans"
        )
    return None


def capture(model: nn.Module, example: torch.Tensor, method: str) -> Any:
    """``torch.export`` of ``model`` with a dynamic batch dimension (a GraphModule); ParamsError naming the method on failure."""
    why = refusal(model, method)
    if why:
        raise ParamsError(why)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    try:
        with _quiet():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as exc:  # export names the construct it cannot capture
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ParamsError(
            f"quantize.method {method} needs a model torch.export can capture; it failed with {type(exc).__name__}: "
            f"{first}. Use quantize.method dynamic or kmeans for this model"
        ) from exc


def _batchnorm_folds(gm: Any) -> dict[str, str]:
    """{conv weight name: BatchNorm module name} of every Conv → BatchNorm pair prepare_pt2e folds."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target):
            conv = node.args[0]
            if getattr(conv, "op", None) == "call_function" and "conv" in str(conv.target):
                w, bn_w = conv.args[1], node.args[1]
                if getattr(w, "op", None) == "get_attr" and getattr(bn_w, "op", None) == "get_attr":
                    out[str(w.target)] = str(bn_w.target).removesuffix(".weight")
    return out


def _weight_ops(prepared: Any) -> dict[str, str]:
    """{op node name: float weight name} of every observed weight (get_attr → observer → op)."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        obs = node.args[1]
        if getattr(obs, "op", None) == "call_module" and str(obs.target).startswith(_OBSERVER):
            src = obs.args[0]
            if getattr(src, "op", None) == "get_attr":
                out[node.name] = str(src.target)
    return out


def _frozen_weights(converted: Any, ops: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{int8 constant: {"param": float weight name, "scale", "zero_point": buffer name or number, "axis"}}."""
    out = {}
    for node in converted.graph.nodes:
        if node.name not in ops or len(node.args) < 2:
            continue
        deq = node.args[1]
        if getattr(deq, "op", None) != "call_function" or "dequantize" not in str(deq.target):
            continue
        src, scale, zp = deq.args[0], deq.args[1], deq.args[2]
        per_channel = "per_channel" in str(deq.target)
        out[str(src.target)] = {
            "param": ops[node.name],
            "scale": str(scale.target) if per_channel else float(scale),
            "zero_point": str(zp.target) if per_channel else int(zp),
            "axis": int(deq.args[3]) if per_channel else None,
        }
    return out


def _drop_unused(gm: Any, weights: dict[str, dict[str, Any]]) -> None:
    """Delete parameters and buffers no node reads (convert keeps the float weights beside their
    int8 copies), and keep the weights' zero points out of the state dict: they are 0 (symmetric
    weights), and a rebuilt graph computes them again."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in [*gm.named_parameters(), *gm.named_buffers()] if n not in used]:
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
    for spec in weights.values():
        if spec["axis"] is not None:
            gm.register_buffer(spec["zero_point"], gm.get_buffer(spec["zero_point"]), persistent=False)


class QuantizedGraph(nn.Module):
    """A pt2e-converted int8 graph of a float model, and where its int8 weights came from.

    ``graph`` holds int8 weights with quantize/dequantize nodes (run it with
    ``measure.compiled`` for int8 kernels); ``weights`` maps each int8 constant to its float
    weight, ``folds`` each folded BatchNorm to its convolution, so the float form
    (``to_float``) and the packer can read the int8 weights by the float model's names.
    """

    def __init__(self, graph: nn.Module, weights: dict[str, dict[str, Any]], folds: dict[str, str]) -> None:
        super().__init__()
        self.graph = graph
        self.weights = weights
        self.folds = folds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> QuantizedGraph:
        # An int8 graph computes the same in both modes (BatchNorm is folded); exported graphs refuse .train().
        self.training = mode
        return self

    def _qparams(self, spec: dict[str, Any]) -> tuple[Any, Any]:
        if spec["axis"] is None:
            return spec["scale"], spec["zero_point"]
        return self.graph.get_buffer(spec["scale"]), self.graph.get_buffer(spec["zero_point"])

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        """The int8 weights as torch quantized tensors, by the float model's weight names."""
        out = {}
        with quiet_torch_ao():
            for const, spec in self.weights.items():
                ints = self.graph.get_buffer(const)
                scale, zp = self._qparams(spec)
                if spec["axis"] is None:
                    out[spec["param"]] = torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zp))
                else:
                    out[spec["param"]] = torch._make_per_channel_quantized_tensor(ints, scale.double(), zp.long(), spec["axis"])
        return out

    def set_quantized_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace int8 weights (and per-channel scales) from quantized tensors named like ``quantized_weights``."""
        by_param = {spec["param"]: (const, spec) for const, spec in self.weights.items()}
        with torch.no_grad():
            for name, qw in weights.items():
                const, spec = by_param[name]
                self.graph.get_buffer(const).copy_(qw.int_repr())
                if spec["axis"] is not None:
                    self.graph.get_buffer(spec["scale"]).copy_(qw.q_per_channel_scales())
                    self.graph.get_buffer(spec["zero_point"]).copy_(qw.q_per_channel_zero_points())


def _quantize(model: nn.Module, example: torch.Tensor, qz: Any, method: str,
              observe: Callable[[nn.Module], None]) -> tuple[QuantizedGraph, dict[str, Any]]:
    """Export, prepare, ``observe`` (calibrate or fix the ranges), convert; return the int8 graph and the
    per-tensor qparams of every observer (what the header needs to rebuild it)."""
    _, flow, _ = _pt2e()
    gm = capture(model.eval(), example, method)
    folds = _batchnorm_folds(gm)
    with _quiet():
        prepared = flow.prepare_pt2e(gm, qz)
        ops = _weight_ops(prepared)
        observe(prepared)
        qparams = {}
        for name, obs in prepared.named_modules():
            if name.startswith(_OBSERVER) and obs.qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scale, zp = obs.calculate_qparams()
                qparams[name] = [float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])]
        converted = flow.convert_pt2e(prepared)
    weights = _frozen_weights(converted, ops)
    _drop_unused(converted, weights)
    return QuantizedGraph(converted, weights, folds), qparams


def calibrate(X: torch.Tensor, batches: int, batch_size: int, seed: int = 0) -> Callable[[nn.Module], None]:
    """An ``observe`` step: ``batches`` random training batches through the observers."""

    def observe(prepared: nn.Module) -> None:
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for b in range(batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                if len(idx) == 0:
                    break
                prepared(X[idx])

    return observe


def _weight_observers(prepared: nn.Module) -> dict[str, nn.Module]:
    """{float weight name: the observer (or fake-quantizer) of that weight} in a prepared graph.

    The observed value is the weight itself, or (QAT, Conv + BatchNorm) the weight
    times BatchNorm's scale, ``mul(weight, ...)``.
    """
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(_OBSERVER) and node.args:
            src = node.args[0]
            if getattr(src, "op", None) == "call_function" and "mul" in str(src.target) and src.args:
                src = src.args[0]
            if getattr(src, "op", None) == "get_attr":
                out[str(src.target)] = prepared.get_submodule(str(node.target))
    return out


def with_weight_qparams(observe: Callable[[nn.Module], None], qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Callable[[nn.Module], None]:
    """``observe``, then the weights named in ``qparams`` take those (scale, zero point) (QAT's learned grids)."""

    def run(prepared: nn.Module) -> None:
        observe(prepared)
        for name, obs in _weight_observers(prepared).items():
            if name in qparams:
                scale, zp = qparams[name]
                obs.calculate_qparams = lambda s=scale, z=zp: (s, z)

    return run


def fixed(qparams: dict[str, list[float]], example: torch.Tensor) -> Callable[[nn.Module], None]:
    """An ``observe`` step that sets every per-tensor observer to stored (scale, zero point).

    Per-channel (weight) observers see the weights once, so their scales are the
    weights' own; the file's or the stored grids replace them afterwards.
    """

    def observe(prepared: nn.Module) -> None:
        with torch.no_grad():
            prepared(example)
        for name, obs in prepared.named_modules():
            if name.startswith(_OBSERVER) and obs.qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                if name not in qparams:
                    raise ValueError(f"observer {name} has no stored scale: the graph differs from the one quantized")
                scale, zp = qparams[name]
                obs.calculate_qparams = lambda s=scale, z=zp: (torch.tensor([s]), torch.tensor([z], dtype=torch.int32))

    return observe


def _entry(kind: str, params: StaticQuant | QATQuant, qparams: dict[str, Any]) -> dict[str, Any]:
    # The per-tensor scales go into the header: rebuilding the graph on load, and
    # ``reapply`` after distillation, need them without calibration data.
    return {"kind": kind, "graph": GRAPH, "bits": params.bits, "per_channel": params.per_channel, "activations": qparams}


def quantize_static(model: nn.Module, header: ModelHeader, params: StaticQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``static``: calibrated post-training int8 weights and activations (``model`` is not modified)."""
    why = refusal(model, "static")
    if why:
        raise ParamsError(why)
    X, _ = env.data("quantize.method static (calibration)").tensors("train")
    qz = quantizer(params.bits, params.per_channel, params.observer, params.percentile)
    observe = calibrate(X, params.calibration_batches, params.calibration_batch_size, env.seed)
    qmodel, qparams = _quantize(copy.deepcopy(model), X[:2], qz, "static", observe)
    return qmodel, header.with_transform(**_entry(KIND, params, qparams))


def _zeros_kept(float_model: nn.Module, header: ModelHeader) -> Callable[[nn.Module], None] | None:
    """An ``after_step`` hook keeping a pruned model's zeros in the exported graph's parameters (same names)."""
    if not header.masked:
        return None
    masks = masks_from_zeros(float_model)

    def hook(gm: nn.Module) -> None:
        params = dict(gm.named_parameters())
        with torch.no_grad():
            for k, m in masks.items():
                if k in params:
                    params[k].mul_(m.to(params[k].device))

    return hook


def quantize_qat(model: nn.Module, header: ModelHeader, params: QATQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``qat``: fine-tune with fake-quantized weights and activations, then convert to int8 as ``static`` does."""
    why = refusal(model, "qat")
    if why:
        raise ParamsError(why)
    pt2e, flow, _ = _pt2e()
    X, _ = env.data("quantize.method qat").tensors("train")
    trained = copy.deepcopy(model)
    gm = capture(copy.deepcopy(model).train(), X[:2], "qat")
    with _quiet():
        prepared = flow.prepare_qat_pt2e(gm, quantizer(params.bits, params.per_channel, qat=True))
    # An exported graph ignores .train()/.eval() unless told how to switch BatchNorm and dropout.
    pt2e.allow_exported_model_train_eval(prepared)
    # fake-quant observers are placed on CPU by prepare
    finetune = dataclasses.replace(env, device=torch.device("cpu")).finetuner(params.finetune, "quantize.finetune")
    with _quiet():
        finetune(prepared, params.finetune.epochs, _zeros_kept(trained, header))
    # The graph's parameters and buffers keep the float model's names: copy the trained ones back.
    own = trained.state_dict()
    trained.load_state_dict({k: v for k, v in prepared.state_dict().items() if k in own and v.shape == own[k].shape}, strict=False)
    # The weights keep the grids they were trained on (QAT's conv-BN weight is the folded one, as
    # static's); activation ranges are calibrated again.
    learned = {k: tuple(t.detach().clone() for t in fq.calculate_qparams()) for k, fq in _weight_observers(prepared).items()}
    calib = StaticQuant()
    observe = with_weight_qparams(calibrate(X, calib.calibration_batches, calib.calibration_batch_size, env.seed), learned)
    qz = quantizer(params.bits, params.per_channel, "minmax")
    qmodel, qparams = _quantize(trained, X[:2], qz, "qat", observe)
    return qmodel, header.with_transform(**_entry(QAT_KIND, params, qparams))


# ------------------------------------------------------------ transform hooks


def _example(header: ModelHeader) -> torch.Tensor:
    return torch.zeros(2, *header.input_shape)


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    if entry.get("graph") != GRAPH:
        return static_fx.rebuild(model, entry, header)
    qz = quantizer(entry["bits"], entry["per_channel"], "minmax")
    ex = _example(header)
    qmodel, _ = _quantize(model, ex, qz, entry["kind"], fixed(entry["activations"], ex))
    return qmodel


#: Attribute of a float model from ``_to_float`` holding the int8 weight grids it came from.
_GRIDS = "_shrinkflow_pt2e_weight_grids"


@functools.cache
def _folded_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (a BatchNorm class) that stays in eval mode: a BatchNorm folded into its convolution.

    Training the float form (distillation of a compressed student) must not turn it back into
    a batch-statistics normalisation, which the next fold would bake into the weights.
    """

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        return base.train(self, False)

    return type(f"Folded{base.__name__}", (base,), {"train": train, "__module__": __name__})


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy the dequantized int8 weights (and float biases) into the float architecture.

    BatchNorm folded into a convolution becomes the identity (the weights hold it), kept
    in eval mode (``_folded_class``);
    a bias the fold created for a bias-less convolution goes to that BatchNorm's
    shift. Every int8 weight's grid (scales) stays on the float model so that
    ``reapply`` puts trained weights back on the same grid.
    """
    if not isinstance(qmodel, QuantizedGraph):
        return static_fx.to_float(qmodel, float_model)
    state = qmodel.graph.state_dict()
    own = float_model.state_dict()
    grids = {}
    with torch.no_grad():
        for bn_name in qmodel.folds.values():
            bn = float_model.get_submodule(bn_name)
            bn.__class__ = _folded_class(type(bn))
            bn.eval()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            if bn.affine:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
        for conv_w, bn_name in qmodel.folds.items():
            made = f"{conv_w}_bias"  # the bias pt2e adds to a bias-less convolution
            if made in state:
                float_model.get_submodule(bn_name).bias.copy_(state[made])
        for name, qw in qmodel.quantized_weights().items():
            own[name].copy_(qw.dequantize())
            grids[name] = qw
        for k, v in state.items():
            if k in own and k not in grids and own[k].shape == v.shape:
                own[k].copy_(v)
    float_model.__dict__[_GRIDS] = grids
    return float_model


def _reapply(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    """int8 again after float training, on the same quantization as before.

    Activations keep their stored ranges; weights go back onto the grids they had
    when ``to_float`` made this float model (so an untrained round trip is exact),
    others get fresh per-channel ranges.
    """
    if entry.get("graph") != GRAPH:
        return static_fx.reapply(model, entry, header)
    grids = model.__dict__.get(_GRIDS, {})
    floats = {k: v.detach().clone() for k, v in model.state_dict().items() if k in grids}
    qmodel = _rebuild(model, entry, header)
    qmin, qmax = weight_range(entry["bits"])
    with quiet_torch_ao():
        on_grid = _on_grids(floats, grids, qmin, qmax)
    qmodel.set_quantized_weights(on_grid)
    return qmodel


def _on_grids(floats: dict[str, torch.Tensor], grids: dict[str, torch.Tensor], qmin: int, qmax: int) -> dict[str, torch.Tensor]:
    """Each float weight quantized onto its stored grid (the scales of a quantized tensor)."""
    on_grid = {}
    for name, grid in grids.items():
        w = floats[name]
        if grid.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            shape = [1] * w.dim()
            shape[grid.q_per_channel_axis()] = -1
            scale = grid.q_per_channel_scales().reshape(shape).to(w.dtype)
            ints = torch.clamp(torch.round(w / scale), qmin, qmax).to(torch.int8)
            on_grid[name] = torch._make_per_channel_quantized_tensor(
                ints, grid.q_per_channel_scales(), grid.q_per_channel_zero_points(), grid.q_per_channel_axis()
            )
        else:
            ints = torch.clamp(torch.round(w / grid.q_scale()), qmin, qmax).to(torch.int8)
            on_grid[name] = torch._make_per_tensor_quantized_tensor(ints, grid.q_scale(), grid.q_zero_point())
    return on_grid


for _kind in (KIND, QAT_KIND):
    register_transform(_kind, Transform(rebuild=_rebuild, to_float=_to_float, reapply=_reapply))
