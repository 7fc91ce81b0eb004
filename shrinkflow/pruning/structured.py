"""Structured pruning: remove whole neurons (Linear) and channels (Conv) with Torch-Pruning.

Torch-Pruning traces the model into a dependency graph, so removing a channel also
removes what consumes it (the next layer's inputs, BatchNorm entries, the other
branch of a residual add). ``sparsity`` here is the fraction of each group's
channels removed (``scope: layer``), or of all channels ranked together
(``scope: global``); the layers become physically smaller.

The saved file stays loadable from the file alone, without unpickling: the header
gets a ``structured`` transform holding Torch-Pruning's pruning history
(layer names and removed indices, plain JSON); loading builds the original
architecture, traces it and replays the history, then loads the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from schemas.prune import StructuredPrune
from shrinkflow.artifacts import ModelHeader, Transform, register_transform
from shrinkflow.masks import WEIGHTED as _ROOTS
from shrinkflow.pruning.magnitude import check_patterns

#: The header transform, named after the method.
KIND = "structured"


def example_input(input_shape: list[int]) -> torch.Tensor:
    """A batch of one zero input: all tracing needs (shapes, not values)."""
    return torch.zeros(1, *input_shape)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layer run last: its outputs are the model's, so it must keep its size."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.modules() if isinstance(m, _ROOTS)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


class StructuredPruner:
    """One Torch-Pruning ``MetaPruner`` for a run; ``step()`` ``steps`` times reaches the target.

    Steps follow Torch-Pruning's linear schedule (step i of n removes up to i/n of
    the target), so an iterative schedule fine-tunes between steps; ``ramp(i, n)``,
    the share of each layer's target reached after step i of n, replaces it (the
    gradual schedule's cubic ramp).
    """

    def __init__(
        self,
        model: nn.Module,
        params: StructuredPrune,
        input_shape: list[int],
        steps: int = 1,
        ramp: Callable[[int, int], float] | None = None,
    ) -> None:
        import torch_pruning as tp

        self.model = model
        self.input_shape = list(input_shape)
        ex = example_input(self.input_shape)
        modules = {name: m for name, m in model.named_modules() if isinstance(m, _ROOTS)}
        layers, skip = dict(params.layers), list(params.skip)
        check_patterns(list(modules), layers, skip)
        ignored = output_layers(model, ex) + [m for n, m in modules.items() if any(fnmatchcase(n, p) for p in skip)]
        ratio_dict: dict[nn.Module, float] = {}
        for n, m in modules.items():
            hits = [p for p in layers if fnmatchcase(n, p)]
            if hits and m not in ignored:
                ratio_dict[m] = float(layers[hits[-1]])
        self.pruner = tp.pruner.MetaPruner(
            model,
            ex,
            importance=tp.importance.GroupMagnitudeImportance(p=params.norm),
            pruning_ratio=params.sparsity,
            pruning_ratio_dict=ratio_dict or None,
            global_pruning=params.scope == "global",
            max_pruning_ratio=params.max_layer_sparsity,
            iterative_steps=steps,
            ignored_layers=ignored,
            **({} if ramp is None else {"iterative_pruning_ratio_scheduler": _scheduler(ramp)}),
        )

    def step(self) -> None:
        """Remove the next share of channels (in place: the model's layers shrink)."""
        self.pruner.step()

    def entry(self) -> dict[str, Any]:
        """The header transform that replays every step so far on the original architecture."""
        history = [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in self.pruner.pruning_history()]
        return {"kind": KIND, "history": history}


def _scheduler(ramp: Callable[[int, int], float]) -> Callable[[float, int], list[float]]:
    """A Torch-Pruning ratio scheduler: each layer's ratio after step i of n is ``ratio · ramp(i, n)``."""

    def scheduler(ratio: float, steps: int) -> list[float]:
        return [ratio * ramp(i, steps) for i in range(steps + 1)]

    return scheduler


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    import torch_pruning as tp

    with torch.enable_grad():  # Torch-Pruning traces with autograd: loading inside torch.no_grad() must work too
        dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input(header.input_shape), verbose=False)
    dg.load_pruning_history([(name, bool(out), list(idxs)) for name, out, idxs in entry["history"]])
    return model


# A pruned model is an ordinary float model of smaller layers: no to_float needed,
# and training it cannot undo the change, so no constraint either.
register_transform(KIND, Transform(rebuild=_rebuild))
