"""Dead units leave the model: neurons and channels whose weights are all gone.

Unstructured pruning (magnitude, random, variational) can leave a unit with no
weights: all its incoming weights zero (its output is a constant, e.g. relu(bias))
or all its outgoing weights zero (nobody reads it). Such a unit costs a bias, a
row of positions and the next layer's matching inputs in the file while computing
nothing that depends on the input. This removes it, with Torch-Pruning: the
dependency graph removes the unit from its layer and the matching inputs from the
layers that read it (through flatten, BatchNorm, residual adds), and the header's
``structured`` transform (the same one structured pruning writes) replays the
removal on load.

A unit with no incoming weights still sends a constant to the next layer; it is
removed only when that constant is zero or can be folded exactly into the next
layer's bias: a Linear reader, or a Conv reader without padding (every output
position sees the whole kernel). The constant is measured, not assumed: the
readers' inputs are recorded on probe inputs, and a unit whose inputs there are not
constant is kept. Afterwards the outputs on the probe are compared with the
original's; if they differ by more than float rounding, nothing is removed.

Outputs stay equal up to float32 rounding (a matrix product over fewer terms sums
in another order), so predictions are the same.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from shrinkflow.artifacts import ModelHeader
from shrinkflow.masks import WEIGHTED
from shrinkflow.models import forward_with_hooks
from shrinkflow.pruning.structured import KIND, attention_heads, dependency_graph, example_input, output_layers

log = logging.getLogger("shrinkflow")

#: Parameterised modules a dead unit may pass through besides Linear/Conv (their outputs stay constant).
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Largest output change (relative to the largest output) accepted as float rounding.
RTOL = 1e-4


def _zero_padding(mod: nn.Module) -> bool:
    pad = getattr(mod, "padding", 0)
    if isinstance(pad, str):
        return pad == "valid"
    return all(int(p) == 0 for p in (pad if isinstance(pad, tuple | list) else (pad,)))


def _foldable(mod: nn.Module) -> bool:
    """A reader into whose bias a constant input can be folded exactly."""
    if mod.bias is None:
        return False
    return isinstance(mod, nn.Linear) or (getattr(mod, "groups", 1) == 1 and _zero_padding(mod))


def _slices(w: torch.Tensor, idxs: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows (dim 0: output units) or columns (dim 1: input units) of a weight, flattened per unit."""
    w = w.detach()
    if dim == 1:
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)[idxs]


def _inputs(model: nn.Module, probe: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """What every Linear/Conv layer receives on ``probe``."""
    seen: dict[nn.Module, torch.Tensor] = {}
    weighted = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    forward_with_hooks(model, probe, weighted, lambda mod, args: seen.__setitem__(mod, args[0].detach()), pre=True)
    return seen


def _dead(
    dg: Any, layer: nn.Module, seen: dict[nn.Module, torch.Tensor], last: set[nn.Module], fixed: set[nn.Module]
) -> tuple[list[int], list[tuple]]:
    """The dead units of ``layer`` and the bias folds their removal needs: ([unit], [(reader, reader idxs, values)]).

    ``fixed``: layers whose width must stay (the model's outputs; a fused attention ``qkv``,
    whose width the forward splits into heads)."""
    import torch_pruning as tp

    n = layer.weight.shape[0]
    fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    group = dg.get_pruning_group(layer, fn, list(range(n)))
    no_input = torch.ones(n, dtype=torch.bool)  # every producer's weights into the unit are zero
    unread = torch.ones(n, dtype=torch.bool)  # every reader's weights from the unit are zero
    read = torch.zeros(n, dtype=torch.bool)
    ok = torch.ones(n, dtype=torch.bool)
    readers = []
    for item in group.items:
        mod = item.dep.target.module
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        if not len(idxs):
            continue
        weighted = isinstance(mod, WEIGHTED) and getattr(mod, "groups", 1) == 1
        if isinstance(mod, nn.Module) and not weighted and any(True for _ in mod.parameters(recurse=False)):
            if not isinstance(mod, _PASS_THROUGH):
                ok[roots] = False  # a layer type whose semantics we do not fold through
            continue
        if not weighted:
            continue
        if dg.is_out_channel_pruning_fn(item.dep.handler):
            if mod in last or mod in fixed:  # the model's outputs, and head-split widths, keep their size
                ok[roots] = False
            zero = (_slices(mod.weight, idxs, 0) == 0).all(1)
            no_input[roots[~zero]] = False
        elif dg.is_in_channel_pruning_fn(item.dep.handler):
            zero = (_slices(mod.weight, idxs, 1) == 0).all(1)
            unread[roots[~zero]] = False
            read[roots] = True
            readers.append((mod, idxs, roots))
    unused = read & unread & ok
    constant = read & no_input & ok & ~unused
    folds = []
    for mod, idxs, roots in readers:
        sel = constant[roots]
        if not sel.any():
            continue
        x = seen.get(mod)
        if x is None:
            constant[roots[sel]] = False
            continue
        # The reader's input per unit index, [k, batch·positions]: a Linear's features are its input's last
        # dimension (tokens may come before), a Conv's channels its second.
        features = x.dim() - 1 if isinstance(mod, nn.Linear) else 1
        cols = x.movedim(features, 0)[idxs[sel]].reshape(int(sel.sum()), -1)
        same = (cols == cols[:, :1]).all(1)
        values = cols[:, 0]
        fine = same & ((values == 0) | _foldable(mod))
        constant[roots[sel][~fine]] = False
        folds.append((mod, idxs[sel], roots[sel], values))
    dead = torch.nonzero(unused | constant).flatten()
    if len(dead) >= n:  # a layer with every unit dead keeps one, so the graph stays valid
        dead = dead[1:]
    dead_set = set(dead.tolist())
    plan = []
    for mod, idxs, roots, values in folds:
        take = torch.tensor([int(r) in dead_set and bool(constant[r]) for r in roots], dtype=torch.bool)
        if take.any():
            plan.append((mod, idxs[take], values[take]))
    return sorted(dead_set), plan


def _fold(mod: nn.Module, idxs: torch.Tensor, values: torch.Tensor) -> None:
    """Add the contribution of constant inputs ``idxs`` (= ``values``) to ``mod``'s bias."""
    if not bool((values != 0).any()):
        return
    with torch.no_grad():
        w = mod.weight.detach().double().transpose(0, 1)[idxs]  # [k, out, *kernel]
        w = w.reshape(w.shape[0], w.shape[1], -1).sum(2)  # a constant input meets every kernel weight
        mod.bias.copy_((mod.bias.double() + (w * values.double()[:, None]).sum(0)).to(mod.bias.dtype))


def remove_dead_units(
    model: nn.Module, header: ModelHeader, probe: torch.Tensor | None = None
) -> tuple[nn.Module, ModelHeader, dict[str, int]]:
    """Remove ``model``'s dead units (in place when any are removed): (model, header, {layer: units removed}).

    Args:
        probe: inputs on which readers' inputs are recorded and outputs compared;
            default 32 standard-normal inputs.

    Returns:
        The header gains a ``structured`` transform replaying the removal; unchanged
        (and an empty dict) when no unit is dead.
    """
    import torch_pruning as tp

    model.eval()
    example = example_input(header.input_shape)
    if probe is None:
        probe = torch.randn(32, *header.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe)
    backup = copy.deepcopy(model)
    removed: dict[str, int] = {}
    try:
        dg = dependency_graph(model, header.input_shape)
        last = set(output_layers(model, example))
        fixed = set(attention_heads(model))
        changed = True
        while changed:  # removing units can leave units of other layers dead: repeat until none is
            changed = False
            seen = _inputs(model, probe)
            for name, layer in model.named_modules():
                if not isinstance(layer, WEIGHTED) or layer in last or layer in fixed or getattr(layer, "groups", 1) != 1:
                    continue
                dead, plan = _dead(dg, layer, seen, last, fixed)
                if not dead:
                    continue
                for mod, idxs, values in plan:
                    _fold(mod, idxs, values)
                fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
                dg.get_pruning_group(layer, fn, dead).prune()
                removed[name] = removed.get(name, 0) + len(dead)
                changed = True
                break  # the graph changed: record the layers' inputs again
        if not removed:
            return backup, header, {}
        with torch.no_grad():
            after = model(probe)
    except Exception as exc:  # a model Torch-Pruning cannot trace or cut: the units stay, the pruned model is fine
        log.warning("dead units kept: removing them failed on this model (%s: %s)", type(exc).__name__, str(exc).splitlines()[0][:200])
        return backup, header, {}
    scale = max(1.0, float(before.abs().max()))
    if after.shape != before.shape or float((after - before).abs().max()) > RTOL * scale:
        log.warning("dead units kept: removing %s changed the outputs beyond float rounding", removed)
        return backup, header, {}
    history = [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in dg.pruning_history()]
    log.info("dead units removed: %s", ", ".join(f"{k} {v}" for k, v in removed.items()))
    return model, header.with_transform(KIND, history=history), removed
