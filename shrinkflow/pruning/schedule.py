"""Pruning schedules: one-shot, iterative, gradual (Zhu & Gupta 2017).

Each schedule prunes a float model and fine-tunes it through a ``finetune(model,
epochs, after_step)`` callable (the stage's ``fit``), so the schedules know nothing
about data or optimizers. Pruned weights stay exactly zero during fine-tuning: the
``after_step`` hook re-applies the masks after every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shrinkflow.pruning import PRUNERS, keep_masked
from shrinkflow.pruning.structured import StructuredPruner

#: finetune(model, epochs, after_step) trains ``model`` in place.
Finetune = Callable[[nn.Module, int, Callable[[nn.Module], None] | None], Any]


@dataclass
class Pruned:
    """The outcome of a schedule."""

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: header transform entries to append (structured pruning), in order.
    transforms: list[dict[str, Any]] = field(default_factory=list)


def zhu_gupta(step: int, ramp_steps: int, initial: float, final: float) -> float:
    """Sparsity at ``step``: ``s_f + (s_i - s_f)(1 - t/T)^3``, then ``s_f`` from ``T`` on."""
    progress = min(1.0, step / max(1, ramp_steps))
    return final + (initial - final) * (1.0 - progress) ** 3


def iterative_targets(final: float, rounds: int) -> list[float]:
    """Sparsity after each round when every round removes the same share of what remains."""
    return [1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1)]


def run_schedule(model: nn.Module, params: Any, input_shape: list[int], finetune: Finetune, steps_per_epoch: int) -> Pruned:
    """Prune ``model`` by ``params.method`` on ``params.schedule``, fine-tuning as it goes."""
    epochs = params.finetune.epochs
    if params.method == "structured":
        return _structured(model, params, input_shape, finetune)

    prune = PRUNERS[params.method]
    if params.schedule == "one-shot":
        masks = prune(model, params)
        if epochs:
            finetune(model, epochs, keep_masked(masks))
        return Pruned(model=model, masks=masks)

    if params.schedule == "iterative":
        masks: dict[str, torch.Tensor] = {}
        for target in iterative_targets(params.sparsity, params.rounds):
            masks = prune(model, params, amount=target / params.sparsity)
            if epochs:
                finetune(model, epochs, keep_masked(masks))
        return Pruned(model=model, masks=masks)

    # gradual: masks grow every `prune_every` steps along the cubic ramp.
    ramp_steps = max(1, math.ceil(params.ramp_fraction * epochs * steps_per_epoch))
    state = {"step": 0, "masks": prune(model, params, amount=params.initial_sparsity / params.sparsity)}

    def after_step(m: nn.Module) -> None:
        state["step"] += 1
        t = state["step"]
        if t <= ramp_steps and (t % params.prune_every == 0 or t == ramp_steps):
            s = zhu_gupta(t, ramp_steps, params.initial_sparsity, params.sparsity)
            state["masks"] = prune(m, params, amount=s / params.sparsity)
        else:
            keep_masked(state["masks"])(m)

    finetune(model, epochs, after_step)
    # The ramp ends at the final targets; pruning again is a no-op unless rounding
    # of steps left it short (zeros rank lowest, so no weight comes back).
    masks = prune(model, params, amount=1.0)
    return Pruned(model=model, masks=masks)


def _structured(model: nn.Module, params: Any, input_shape: list[int], finetune: Finetune) -> Pruned:
    """Structured schedules: the layers physically shrink at each step, so fine-tuning restarts after it.

    one-shot: one step, then ``finetune.epochs``; iterative: ``rounds`` × (step,
    ``finetune.epochs``); gradual: the cubic ramp advances once per epoch (a new
    optimizer is needed whenever the layers change) over the first
    ``ceil(ramp_fraction · epochs)`` epochs, each starting with a step, and the
    remaining epochs recover at the final sparsity.
    """
    epochs = params.finetune.epochs
    ramp = None
    if params.schedule == "gradual":
        steps = max(1, math.ceil(params.ramp_fraction * epochs))
        per_step, tail = 1, epochs - steps

        def ramp(i: int, n: int) -> float:
            return zhu_gupta(i, n, params.initial_sparsity, params.sparsity) / params.sparsity if i else 0.0
    else:
        steps = params.rounds if params.schedule == "iterative" else 1
        per_step, tail = epochs, 0
    pruner = StructuredPruner(model, params, input_shape, steps=steps, ramp=ramp)
    for _ in range(steps):
        pruner.step()
        if per_step:
            finetune(model, per_step, None)
    if tail > 0:
        finetune(model, tail, None)
    return Pruned(model=model, transforms=[pruner.entry()])
