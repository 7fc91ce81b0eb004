"""n-bit weight sharing (Deep Compression, Han et al. 2016): one k-means codebook per layer.

Each chosen Linear/Conv layer keeps ``2**bits`` distinct weight values: a float32
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
from shrinkflow.masks import WEIGHTED
from shrinkflow.methods import Env

KIND = "kmeans"
#: Layer types whose ``weight`` can be shared.
SHAREABLE = WEIGHTED


# ----------------------------------------------------------------- the module form


def _shared_weight(self: nn.Module) -> torch.Tensor:
    # Materialising codebook[index] costs a gather over every weight per call (it made
    # LeNet-5 batch-1 inference ~5x slower), so the result is cached until a buffer
    # is replaced or changed in place (load_state_dict bumps ``_version``).
    cb, idx = self.weight_codebook, self.weight_index
    key = (cb.data_ptr(), cb._version, idx.data_ptr(), idx._version, cb.device)
    cached = self.__dict__.get("_shared_weight_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        w = cb[idx.long()]
    self.__dict__["_shared_weight_cache"] = (key, w)
    return w


@functools.cache
def _shared_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (e.g. nn.Linear) whose ``weight`` is computed from codebook + indices."""
    return type(f"Shared{base.__name__}", (base,), {"weight": property(_shared_weight), "__module__": __name__})


def share(mod: nn.Module, codebook: torch.Tensor, index: torch.Tensor) -> None:
    """Turn a Linear/Conv layer into its weight-shared form, in place.

    Args:
        mod: the layer; its float ``weight`` parameter is dropped.
        codebook: float32 values, at most 256.
        index: uint8 tensor shaped like the weight, indexing ``codebook``.
    """
    if isinstance(type(mod).__dict__.get("weight"), property):  # already shared
        mod.weight_codebook = codebook.detach().float().clone()
        mod.weight_index = index.to(torch.uint8).clone()
        return
    shape = mod.weight.shape
    if index.shape != shape:
        raise ValueError(f"index shape {tuple(index.shape)} does not match weight shape {tuple(shape)}")
    del mod._parameters["weight"]
    mod.__class__ = _shared_class(type(mod))
    mod.register_buffer("weight_codebook", codebook.detach().float().clone())
    mod.register_buffer("weight_index", index.to(torch.uint8).clone())


def is_shared(mod: nn.Module) -> bool:
    return hasattr(mod, "weight_codebook") and hasattr(mod, "weight_index")


def codebooks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every weight-shared layer's ``(codebook float32 [k], indices uint8 [weight shape])``, by layer name.

    ``codebook[indices.long()]`` is the layer's weight. Entropy coders (Huffman
    packing) read the indices from here.
    """
    return {name: (m.weight_codebook, m.weight_index) for name, m in model.named_modules() if is_shared(m)}


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
    """{layer name: bits (or ``"auto"``)} of the layers to share; patterns must match some layer."""
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, SHAREABLE) or is_shared(mod)}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise ParamsError(
                f"quantize.layer_bits: pattern {pattern!r} matches no Linear/Conv layer; layers are: {', '.join(layers)}"
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
    mods = dict(model.named_modules())
    for name, bits in layers.items():
        mod = mods[name]
        found = (clusters or {}).get((name, bits))
        codebook, index = found if found is not None else cluster(mod.weight, bits, seed)
        share(mod, codebook, index)
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
    mods = dict(model.named_modules())
    nnz = {n: int(torch.count_nonzero(mods[n].weight)) for n in layers}
    clusters: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    measured: dict[str, dict[int, float]] = {}
    for name in layers:
        measured[name] = {}
        for b in choices:
            clusters[(name, b)] = cluster(mods[name].weight, b, env.seed)
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
    mods = dict(float_model.named_modules())
    groups: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for name in layers:
        w = mods[name].weight.detach()
        values, inverse = torch.unique(w.flatten().cpu(), return_inverse=True)
        groups[name] = (inverse, values == 0, len(values))

    def hook(model: nn.Module) -> None:
        live = dict(model.named_modules())
        with torch.no_grad():
            for name, (inverse, zero, k) in groups.items():
                w = live[name].weight
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
    mods = dict(model.named_modules())
    for name, bits in entry["layers"].items():
        mod = mods[name]
        k = 2**bits
        share(mod, torch.zeros(k), torch.zeros(mod.weight.shape, dtype=torch.uint8))
    return model


def _to_float(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """Copy every weight (shared ones as ``codebook[index]``) into the float architecture."""
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in float_model.named_modules():
            q = qmods.get(name)
            if q is not None and is_shared(q):
                mod.weight.copy_(q.weight)
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
    mods = dict(model.named_modules())
    for name, bits in entry["layers"].items():
        mod = mods[name]
        if is_shared(mod):
            continue
        w = mod.weight.detach().cpu()
        values, inverse = torch.unique(w.flatten(), return_inverse=True)
        if len(values) <= 2**bits:
            values, inverse = _zero_first(values, inverse)
            share(mod, pad(values, bits), inverse.view(w.shape))
        else:
            codebook, index = cluster(w, bits)
            share(mod, codebook, index)
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
