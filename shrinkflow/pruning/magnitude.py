"""Unstructured pruning: L1 magnitude (global or per layer) and the random baseline.

We compute masks ourselves instead of calling ``torch.nn.utils.prune``: that module
reparametrises weights into ``weight_orig`` + ``weight_mask`` (a state dict twice
the size, with hooks) while we want plain zeros in a plain state dict.

Both methods score every weight and zero the ``k`` lowest scores, with ``k`` from the
target exactly (``topk``, not a threshold, so ties cannot overshoot). Weights that
are already zero score lowest, so masks only grow: iterative and gradual schedules
never revive a pruned weight.

Which layers get which target (see ``layer_targets``):

* ``skip`` patterns: never pruned;
* ``layers`` overrides ``{pattern: sparsity}``: that layer alone reaches that sparsity;
* every other layer: ``sparsity``, either each layer on its own (``scope: layer``) or
  one ranking across all of them (``scope: global``).

Patterns are shell-style (``fnmatch``, case-sensitive) on module names as
``model.named_modules()`` spells them (``net.1``, ``features.*``); a pattern that
matches no prunable layer is an error naming the layers there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

from schemas.prune import MagnitudePrune, RandomPrune
from shrinkflow.errors import ParamsError
from shrinkflow.masks import layer_name, prunable

#: Params of the methods that zero single weights.
Unstructured = MagnitudePrune | RandomPrune


def _matches(name: str, patterns: Iterable[str]) -> list[str]:
    return [p for p in patterns if fnmatchcase(name, p)]


def check_patterns(names: list[str], layers: dict[str, float], skip: list[str]) -> None:
    """Every ``prune.layers`` / ``prune.skip`` pattern must match a prunable layer.

    Raises:
        ParamsError: naming the pattern and the layers there are.
    """
    for key, patterns in (("layers", layers), ("skip", skip)):
        for p in patterns:
            if not any(fnmatchcase(n, p) for n in names):
                raise ParamsError(
                    f"prune.{key}: pattern {p!r} matches no prunable layer; the layers are: {', '.join(names)} "
                    "(shell-style patterns on module names, e.g. 'net.*')"
                )


def layer_targets(names: list[str], params: Unstructured) -> tuple[dict[str, float], list[str]]:
    """Split layers into fixed per-layer targets and the pool that shares ``params.sparsity``.

    Args:
        names: prunable layer names (module names).
        params: the prune section (``sparsity``, ``layers``, ``skip``, ``scope``).

    Returns:
        ({layer: its own target}, [layers in the shared pool]). With ``scope: layer``
        the pool is empty and every non-skipped layer has its own target.

    Raises:
        ParamsError: a pattern in ``layers`` or ``skip`` matches no layer.
    """
    layers, skip = dict(params.layers), list(params.skip)
    check_patterns(names, layers, skip)
    fixed: dict[str, float] = {}
    pool: list[str] = []
    for n in names:
        if _matches(n, skip):
            continue
        hits = _matches(n, layers)
        if hits:
            fixed[n] = float(layers[hits[-1]])  # the last matching pattern wins, as in params order
        elif params.scope == "layer":
            fixed[n] = float(params.sparsity)
        else:
            pool.append(n)
    return fixed, pool


def _prune_lowest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks (True = kept) zeroing the ``k`` lowest scores across ``scores``."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def prune_by_scores(
    model: nn.Module, params: Unstructured, score: Callable[[torch.Tensor], torch.Tensor], amount: float = 1.0
) -> dict[str, torch.Tensor]:
    """Zero the lowest-scoring weights in place to each layer's target × ``amount``.

    Args:
        score: ``score(weight) -> tensor`` of the same shape (zeros must score lowest).
        amount: fraction of the final targets to reach now (schedules ramp it to 1).

    Returns:
        {weight key: mask (True = kept)} for every prunable weight.
    """
    weights = prunable(model)
    by_layer = {layer_name(k): k for k in weights}
    fixed, pool = layer_targets(list(by_layer), params)
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    with torch.no_grad():
        groups = [([by_layer[n]], s) for n, s in fixed.items()]
        if pool:
            groups.append(([by_layer[n] for n in pool], float(params.sparsity)))
        for keys, target in groups:
            ws = [weights[k] for k in keys]
            k = int(round(target * amount * sum(w.numel() for w in ws)))
            for key, m in zip(keys, _prune_lowest([score(w.detach()) for w in ws], k), strict=True):
                masks[key] = m
        for k, w in weights.items():
            w.mul_(masks[k])
    return masks


def magnitude_prune(model: nn.Module, params: Unstructured, amount: float = 1.0) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude weights in place; return the masks (True = kept)."""
    return prune_by_scores(model, params, lambda w: w.abs(), amount)


def random_prune(model: nn.Module, params: Unstructured, amount: float = 1.0) -> dict[str, torch.Tensor]:
    """Baseline: zero weights chosen uniformly at random (same targets as magnitude).

    Draws from torch's global generator, which the stage seeds, so a run is
    reproducible. Weights already zero are taken first so masks only grow.
    """
    return prune_by_scores(model, params, lambda w: torch.where(w == 0, -1.0, torch.rand_like(w)), amount)


#: ``prune.method`` → masker(model, params, amount=1.0) -> {weight key: mask (True = kept)}: zeroes
#: weights in place; the methods' entry points (``shrinkflow.pruning.PRUNERS``) add schedules and fine-tuning.
MASKERS: dict[str, Callable[[nn.Module, Unstructured, float], dict[str, torch.Tensor]]] = {
    "magnitude": magnitude_prune,
    "random": random_prune,
}
