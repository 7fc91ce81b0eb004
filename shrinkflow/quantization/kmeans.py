"""n-bit weight sharing (Deep Compression, Han et al. 2016): one k-means codebook per layer.

Each chosen weight (Linear/Conv ``weight``, LSTM/GRU ``weight_ih``/``weight_hh``,
attention input projections: every ``masks.prunable`` weight) keeps ``2**bits`` distinct weight values: a float32
codebook and a uint8 index per weight, which is what the model file stores (so a
4-bit layer takes ~1/4 of its fp32 bytes before any entropy coding). The layer
computes ``weight = codebook[index]`` on the fly, so it runs like the float layer.

Clustering: 1-D k-means with linear initialisation between the layer's min and max
weight (the initialisation Deep Compression found best), done by scikit-learn's
``KMeans``. Pruned zeros are not clustered: a layer with zeros reserves one code for
an exact 0, so its zeros survive and it still holds at most ``2**bits`` values.

Centroid fine-tuning trains the float model with every weight tied to its
cluster: after each optimizer step the weights of a cluster are set to their mean,
so the centroid moves by the cluster's pooled (averaged) gradient step. The same
hook (``Transform.constrain``) keeps later training (distill) inside the codebook,
and ``reapply`` reads the tied weights back into codebook + indices losslessly.

``bits: auto`` chooses each layer's width from a measured per-layer sensitivity
under a validation-quality budget (:func:`choose_bits`).

Reading codebooks (for entropy coding or packing): :func:`codebooks`.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from schemas.quantize import KMeansQuant
from shrinkflow.artifacts import ModelHeader, Transform, keep_constraints, register_transform
from shrinkflow.errors import ParamsError
from shrinkflow.masks import layer_name, prunable
from shrinkflow.methods import Env

KIND = "kmeans"


# ----------------------------------------------------------------- the module form


def _shared_weight(self: nn.Module, name: str) -> torch.Tensor:
    # Materialising codebook[index] costs a gather over every weight per call (it made
    # LeNet-5 batch-1 inference ~5x slower), so the result is cached until a buffer
    # is replaced or changed in place (load_state_dict bumps ``_version``).
    cb, idx = getattr(self, f"{name}_codebook"), getattr(self, f"{name}_index")
    key = (cb.data_ptr(), cb._version, idx.data_ptr(), idx._version, cb.device)
    cache = self.__dict__.setdefault("_shared_weight_cache", {})
    cached = cache.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        w = cb[idx.long()]
    cache[name] = (key, w)
    return w


@functools.cache
def _shared_class(base: type[nn.Module], names: frozenset[str]) -> type[nn.Module]:
    """``base`` (e.g. nn.Linear, nn.LSTM) whose weights ``names`` are computed from codebook + indices.

    A recurrent layer reads its weights by name at each forward (and notices the new
    tensor), so the same property works for ``weight_ih_l0`` as for a Linear's ``weight``.
    """
    props = {n: property(functools.partial(_shared_weight, name=n)) for n in sorted(names)}
    return type(f"Shared{base.__name__}", (base,), {**props, "_shared_names": names, "_shared_base": base, "__module__": __name__})


def share(mod: nn.Module, codebook: torch.Tensor, index: torch.Tensor, name: str = "weight") -> None:
    """Turn one weight of a layer into its shared form, in place.

    Args:
        mod: the layer (Linear, Conv, LSTM, GRU, MultiheadAttention); its float parameter
            ``name`` is dropped.
        codebook: float32 values, at most 256.
        index: uint8 tensor shaped like the weight, indexing ``codebook``.
        name: the weight's attribute (``weight``, ``weight_ih_l0``, ``in_proj_weight``, ...).
    """
    names = frozenset(getattr(type(mod), "_shared_names", frozenset()))
    if name in names:  # already shared
        setattr(mod, f"{name}_codebook", codebook.detach().float().clone())
        setattr(mod, f"{name}_index", index.to(torch.uint8).clone())
        return
    shape = getattr(mod, name).shape
    if index.shape != shape:
        raise ValueError(f"index shape {tuple(index.shape)} does not match weight shape {tuple(shape)}")
    del mod._parameters[name]
    mod.__class__ = _shared_class(getattr(type(mod), "_shared_base", type(mod)), names | {name})
    mod.register_buffer(f"{name}_codebook", codebook.detach().float().clone())
    mod.register_buffer(f"{name}_index", index.to(torch.uint8).clone())


def is_shared(mod: nn.Module, name: str = "weight") -> bool:
    return name in getattr(type(mod), "_shared_names", ())


def _locate(model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    """(module, weight attribute) of a layer name: a module's name for its ``weight``, else ``module.weight_ih_l0``."""
    mods = dict(model.named_modules())
    if layer in mods:
        return mods[layer], "weight"
    parent, _, attr = layer.rpartition(".")
    return mods[parent], attr


def codebooks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every shared weight's ``(codebook float32 [k], indices uint8 [weight shape])``, by layer name.

    ``codebook[indices.long()]`` is the weight; the layer name is the module's for a
    ``weight``, ``module.attr`` for others (``rnn.weight_hh_l0``). Entropy coders
    (Huffman packing) read the indices from here.
    """
    out = {}
    for mname, m in model.named_modules():
        for n in sorted(getattr(type(m), "_shared_names", ())):
            key = mname if n == "weight" else (f"{mname}.{n}" if mname else n)
            out[key] = (getattr(m, f"{n}_codebook"), getattr(m, f"{n}_index"))
    return out


# ------------------------------------------------------------------- clustering


def bits_for(name: str, default: int | None, patterns: dict[str, int | None]) -> int | None:
    """Bits for layer ``name``: the first pattern (fnmatch) that matches, else ``default``; None = keep float."""
    for pattern, bits in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    return default


def cluster(weight: torch.Tensor, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means codebook and indices for one weight tensor; exact zeros keep code 0 = 0.0.

    Returns:
        (codebook float32 [<= 2**bits], indices uint8 shaped like ``weight``).
    """
    from sklearn.cluster import KMeans

    w = weight.detach().cpu().float()
    flat = w.flatten()
    nonzero = flat != 0
    has_zero = bool((~nonzero).any())
    values = flat[nonzero].numpy().astype(np.float64)
    k = min(2**bits - int(has_zero), len(np.unique(values)))
    index = torch.zeros(flat.shape, dtype=torch.long)
    if k > 0:
        # Linear initialisation over [min, max] (Deep Compression §3.1): keeps the rare
        # large weights represented, which random or density-based init loses.
        init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
        with warnings.catch_warnings():
            # sklearn warns when fewer distinct points than clusters remain; harmless here.
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, random_state=seed).fit(values.reshape(-1, 1))
        centers = torch.from_numpy(km.cluster_centers_.ravel()).float()
        index[nonzero] = torch.from_numpy(km.labels_).long() + int(has_zero)
    else:
        centers = torch.empty(0)
    codebook = torch.cat([torch.zeros(1), centers]) if has_zero else centers
    return pad(codebook, bits), index.view(w.shape).to(torch.uint8)


def pad(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """The codebook padded with zeros to ``2**bits`` entries, so its shape is known on load."""
    return torch.cat([codebook.float(), codebook.new_zeros(2**bits - len(codebook))])


def shareable_layers(model: nn.Module, default: int | str | None, patterns: dict[str, int | None]) -> dict[str, int | str]:
    """{layer name: bits (or ``"auto"``)} of the weights to share (every prunable weight: ``masks.prunable``);
    patterns must match some layer."""
    layers = [layer_name(k) for k in prunable(model)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise ParamsError(
                f"quantize.layer_bits: pattern {pattern!r} matches no weight layer; layers are: {', '.join(layers)}"
            )
    chosen = {}
    for name in layers:
        bits = bits_for(name, default, patterns)
        if bits is not None:
            chosen[name] = bits
    return chosen


def _apply(model: nn.Module, layers: dict[str, int], seed: int,
           clusters: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Share each listed layer at its bits; ``clusters`` holds (codebook, indices) already computed by (layer, bits)."""
    for name, bits in layers.items():
        mod, attr = _locate(model, name)
        found = (clusters or {}).get((name, bits))
        codebook, index = found if found is not None else cluster(getattr(mod, attr), bits, seed)
        share(mod, codebook, index, attr)
    return model


# ------------------------------------------------------- bit widths, chosen


def _index_bits(nnz: int, bits: int) -> int:
    """What a layer costs at ``bits`` in a packed file, roughly: an index per non-zero plus a float16 codebook."""
    return nnz * bits + 16 * min(2**bits, max(nnz, 1))


def choose_bits(
    model: nn.Module, layers: list[str], choices: list[int], budget: float, env: Env, where: str = "quantize.bits: auto",
) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-layer widths from a measured sensitivity, under a quality budget.

    Every layer is clustered alone at each width in ``choices`` (the others stay
    float) and the validation quality measured; a layer's loss at a width is the
    largest drop measured at that width or any wider one (fewer bits never count as
    better). Starting from the widest choice everywhere, the layer whose next
    narrower width saves the most index bits per unit of added loss is narrowed,
    while the summed losses stay within ``budget``. Then all layers are clustered
    together and measured: while the joint loss exceeds the budget, the layer with
    the largest loss at its width gets the next wider one.

    Returns:
        ({layer: bits}, the table: baseline, per-layer loss by width, the joint loss).
    """
    from shrinkflow.training import predict, quality

    splits = env.data(where)
    X, y = splits.tensors("val")
    if not len(X):
        raise ParamsError(f"{where} measures validation quality: set data.val_fraction above 0")
    sign = 1.0 if splits.task == "classification" else -1.0  # accuracy falls, MSE rises

    def loss(m: nn.Module) -> float:
        return max(0.0, sign * (base - quality(predict(m, X), y, splits.task)))

    base = quality(predict(model, X), y, splits.task)
    choices = sorted(set(choices))
    weights = {n: getattr(*_locate(model, n)) for n in layers}
    nnz = {n: int(torch.count_nonzero(w)) for n, w in weights.items()}
    clusters: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    measured: dict[str, dict[int, float]] = {}
    for name in layers:
        measured[name] = {}
        for b in choices:
            clusters[(name, b)] = cluster(weights[name], b, env.seed)
            measured[name][b] = loss(_apply(copy.deepcopy(model), {name: b}, env.seed, clusters))
    # Fewer bits never lose less: each width's loss is the worst at it or any wider width.
    worst = {n: {b: max(measured[n][c] for c in choices if c >= b) for b in choices} for n in layers}
    chosen = {n: choices[-1] for n in layers}

    def total(bits: dict[str, int]) -> float:
        return sum(worst[n][bits[n]] for n in layers)

    while True:
        best: tuple[float, str] | None = None
        for n in layers:
            i = choices.index(chosen[n])
            if i == 0:
                continue
            trial = {**chosen, n: choices[i - 1]}
            if total(trial) > budget + 1e-12:
                continue
            saved = _index_bits(nnz[n], chosen[n]) - _index_bits(nnz[n], choices[i - 1])
            added = worst[n][choices[i - 1]] - worst[n][chosen[n]]
            score = saved / (added + 1e-6)
            if best is None or score > best[0]:
                best = (score, n)
        if best is None:
            break
        chosen[best[1]] = choices[choices.index(chosen[best[1]]) - 1]
    joint = loss(_apply(copy.deepcopy(model), chosen, env.seed, clusters))
    while joint > budget + 1e-12:
        wider = [n for n in layers if chosen[n] < choices[-1]]
        if not wider:
            break
        n = max(wider, key=lambda k: (worst[k][chosen[k]], nnz[k]))
        chosen[n] = choices[choices.index(chosen[n]) + 1]
        joint = loss(_apply(copy.deepcopy(model), chosen, env.seed, clusters))
    table = {
        "metric": "accuracy" if splits.task == "classification" else "mse",
        "baseline": base,
        "budget": budget,
        "loss": {n: {str(b): measured[n][b] for b in choices} for n in layers},
        "joint_loss": joint,
        "bits": dict(chosen),
    }
    return chosen, table


# --------------------------------------------------------- tying (fine-tuning)


def tie_hook(float_model: nn.Module, layers: dict[str, int]) -> Callable[[nn.Module], None]:
    """``after_step`` hook keeping each listed layer's weights tied to today's clusters.

    Clusters are read from the weights' current distinct values (the float model
    holds ``codebook[index]``). After each step every cluster is set to the mean of
    its weights, i.e. the centroid takes the averaged update of its members; a
    cluster whose value is exactly 0 (pruned weights) stays 0.
    """
    groups: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for name in layers:
        mod, attr = _locate(float_model, name)
        w = getattr(mod, attr).detach()
        values, inverse = torch.unique(w.flatten().cpu(), return_inverse=True)
        groups[name] = (inverse, values == 0, len(values))

    def hook(model: nn.Module) -> None:
        with torch.no_grad():
            for name, (inverse, zero, k) in groups.items():
                mod, attr = _locate(model, name)
                w = getattr(mod, attr)
                inv = inverse.to(w.device)
                flat = w.detach().flatten()
                sums = torch.zeros(k, dtype=flat.dtype, device=w.device).index_add_(0, inv, flat)
                counts = torch.bincount(inv, minlength=k).to(flat.dtype)
                means = (sums / counts).masked_fill_(zero.to(w.device), 0.0)
                w.copy_(means[inv].view_as(w))

    return hook


# ----------------------------------------------------------------- the handler


def quantize_kmeans(model: nn.Module, header: ModelHeader, params: KMeansQuant, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``kmeans``: share each chosen layer's weights through a ``2**bits`` codebook; optionally fine-tune the centroids.

    ``model`` (float, possibly pruned) is not modified.
    """
    fmodel = copy.deepcopy(model).eval()
    layers = shareable_layers(fmodel, params.bits, dict(params.layer_bits))
    if not layers:
        raise ParamsError("quantize.layer_bits leaves no layer to quantize: set quantize.bits or a pattern with bits 2..8")
    auto = [n for n, b in layers.items() if b == "auto"]
    if auto:
        # The fixed layers are shared first: the widths of the others are chosen around them.
        fixed = {n: b for n, b in layers.items() if b != "auto"}
        picked, table = choose_bits(_apply(copy.deepcopy(fmodel), fixed, env.seed), auto, list(params.auto_bits), params.auto_budget, env)
        env.notes["bit_sensitivity"] = table
        layers = {n: (picked[n] if b == "auto" else b) for n, b in layers.items()}
    qmodel = _apply(fmodel, layers, env.seed)
    entry = {"kind": KIND, "layers": layers}
    shared = header.with_transform(KIND, layers=layers)
    ft = params.finetune
    if ft.epochs:
        finetune = env.finetuner(ft, "quantize.finetune")
        trainable = _to_float(qmodel, copy.deepcopy(model))
        # pruned zeros stay zero and weights stay tied to their centroids (this transform's `constrain`)
        finetune(trainable, ft.epochs, keep_constraints(trainable, shared))
        qmodel = _reapply(trainable, entry, None)
    return qmodel, shared


# ------------------------------------------------------------ transform hooks


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader | None) -> nn.Module:
    for name, bits in entry["layers"].items():
        mod, attr = _locate(model, name)
        share(mod, torch.zeros(2**bits), torch.zeros(getattr(mod, attr).shape, dtype=torch.uint8), attr)
    return model


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy every weight (shared ones as ``codebook[index]``) into the float architecture."""
    with torch.no_grad():
        for name in codebooks(qmodel):
            (q, attr), (mod, _) = _locate(qmodel, name), _locate(float_model, name)
            getattr(mod, attr).copy_(getattr(q, attr))
        qstate = qmodel.state_dict()
        for name, p in [*float_model.named_parameters(), *float_model.named_buffers()]:
            if name in qstate:
                p.copy_(qstate[name])
    return float_model


def _reapply(model: nn.Module, entry: dict[str, Any], header: ModelHeader | None) -> nn.Module:
    """Codebook + indices from a trained float model whose layers were kept tied.

    Weights tied by :func:`tie_hook` hold at most ``2**bits`` values and convert
    exactly; a layer that holds more (trained without the hook) is clustered again.
    """
    for name, bits in entry["layers"].items():
        mod, attr = _locate(model, name)
        if is_shared(mod, attr):
            continue
        w = getattr(mod, attr).detach().cpu()
        values, inverse = torch.unique(w.flatten(), return_inverse=True)
        if len(values) <= 2**bits:
            values, inverse = _zero_first(values, inverse)
            share(mod, pad(values, bits), inverse.view(w.shape), attr)
        else:
            codebook, index = cluster(w, bits)
            share(mod, codebook, index, attr)
    return model


def _zero_first(values: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber codes so that an exact 0.0, if present, is code 0 (sparse storage then skips pruned weights)."""
    zero = (values == 0).nonzero().flatten()
    if len(zero) == 0 or int(zero[0]) == 0:
        return values, inverse
    z = int(zero[0])
    order = torch.cat([zero, torch.arange(z), torch.arange(z + 1, len(values))])
    new_code = torch.empty_like(order)
    new_code[order] = torch.arange(len(order))
    return values[order], new_code[inverse]


def _constrain(float_model: nn.Module, entry: dict[str, Any]) -> Callable[[nn.Module], None]:
    return tie_hook(float_model, entry["layers"])


register_transform(KIND, Transform(rebuild=_rebuild, to_float=_to_float, reapply=_reapply, constrain=_constrain))
