"""The pruning methods' entry points: a method, on a schedule, with fine-tuning.

Schedules: ``one-shot``, ``iterative`` (``rounds`` equal shares of the remaining
weights, or explicit per-step targets ``steps`` with ``step_epochs``), ``gradual``
(Zhu & Gupta 2017). Pruned weights stay exactly zero during fine-tuning: the
``after_step`` hook re-applies the masks after every optimizer step. Fine-tuning
goes through ``Env.finetuner`` (the section's optimizer and learning-rate schedule,
the teacher's soft targets if asked), so the schedules know nothing about data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from schemas.prune import StructuredPrune
from shrinkflow.artifacts import ModelHeader
from shrinkflow.masks import keep_masked
from shrinkflow.methods import Env, Finetuner
from shrinkflow.pruning.magnitude import MASKERS, Unstructured
from shrinkflow.pruning.storage import NAME as SPARSE
from shrinkflow.pruning.structured import StructuredPruner


def zhu_gupta(step: int, ramp_steps: int, initial: float, final: float) -> float:
    """Sparsity at ``step``: ``s_f + (s_i - s_f)(1 - t/T)^3``, then ``s_f`` from ``T`` on."""
    progress = min(1.0, step / max(1, ramp_steps))
    return final + (initial - final) * (1.0 - progress) ** 3


def iterative_targets(final: float, rounds: int) -> list[float]:
    """Sparsity after each round when every round removes the same share of what remains."""
    return [1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1)]


def unstructured_schedule(model: nn.Module, params: Unstructured, finetune: Finetuner, steps_per_epoch: int) -> dict[str, torch.Tensor]:
    """Zero ``params.method``'s weights in place on ``params.schedule``; return the final masks."""
    prune = MASKERS[params.method]
    epochs = params.finetune.epochs
    if params.schedule == "one-shot":
        masks = prune(model, params, 1.0)
        if epochs:
            finetune(model, epochs, keep_masked(masks))
        return masks

    if params.schedule == "iterative":
        masks: dict[str, torch.Tensor] = {}
        for share, step_epochs in params.step_plan():
            masks = prune(model, params, share)
            if step_epochs:
                finetune(model, step_epochs, keep_masked(masks))
        return masks

    # gradual: masks grow every `prune_every` steps along the cubic ramp.
    ramp_steps = max(1, math.ceil(params.ramp_fraction * epochs * steps_per_epoch))
    state = {"step": 0, "masks": prune(model, params, params.initial_sparsity / params.sparsity)}

    def after_step(m: nn.Module) -> None:
        state["step"] += 1
        t = state["step"]
        if t <= ramp_steps and (t % params.prune_every == 0 or t == ramp_steps):
            s = zhu_gupta(t, ramp_steps, params.initial_sparsity, params.sparsity)
            state["masks"] = prune(m, params, s / params.sparsity)
        else:
            keep_masked(state["masks"])(m)

    finetune(model, epochs, after_step)
    # The ramp ends at the final targets; pruning again is a no-op unless rounding
    # of steps left it short (zeros rank lowest, so no weight comes back).
    return prune(model, params, 1.0)


def prune_unstructured(model: nn.Module, header: ModelHeader, params: Unstructured, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``magnitude`` / ``random``: zero weights (in place) on the schedule, fine-tuning with the zeros kept.

    The header is marked ``masked`` (later training keeps the zeros) and stored
    ``sparse`` (bitmask + values: the file shrinks with sparsity).
    """
    splits = env.data("prune")
    finetune = env.finetuner(params.finetune, "prune.finetune")
    steps_per_epoch = math.ceil(len(splits.X_train) / params.finetune.batch_size)
    unstructured_schedule(model, params, finetune, steps_per_epoch)
    return model, header.model_copy(update={"masked": True, "storage": SPARSE})


def structured_schedule(model: nn.Module, params: StructuredPrune, input_shape: list[int], finetune: Finetuner) -> dict:
    """Remove neurons/channels of ``model`` (in place) on ``params.schedule``; return the header transform entry.

    The layers change shape at each step, so fine-tuning restarts (with a new
    optimizer) after it. one-shot: one step, then ``finetune.epochs``; iterative:
    ``rounds`` steps on Torch-Pruning's linear schedule, or the explicit ``steps``,
    each followed by its fine-tuning epochs; gradual: the cubic ramp advances once
    per epoch over the first ``ceil(ramp_fraction · epochs)`` epochs, each starting
    with a step, and the remaining epochs recover at the final sparsity.
    """
    epochs = params.finetune.epochs
    ramp: Callable[[int, int], float] | None = None  # None: Torch-Pruning's linear schedule
    if params.schedule == "gradual":
        n_steps = max(1, math.ceil(params.ramp_fraction * epochs))
        phases = [1] * n_steps + ([epochs - n_steps] if epochs > n_steps else [])  # fine-tuning epochs after each step

        def ramp(i: int, n: int) -> float:
            return zhu_gupta(i, n, params.initial_sparsity, params.sparsity) / params.sparsity if i else 0.0
    elif params.schedule == "iterative":
        shares = [0.0, *(params.steps or [])]
        n_steps = len(params.steps) if params.steps else params.rounds
        phases = list(params.step_epochs or [epochs] * n_steps)
        if params.steps:

            def ramp(i: int, n: int) -> float:
                return shares[i]
    else:
        n_steps, phases = 1, [epochs]
    pruner = StructuredPruner(model, params, input_shape, steps=n_steps, ramp=ramp)
    for i, phase_epochs in enumerate(phases):
        if i < n_steps:
            pruner.step()
        if phase_epochs:
            finetune(model, phase_epochs, None)
    return pruner.entry()


def prune_structured(model: nn.Module, header: ModelHeader, params: StructuredPrune, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``structured``: remove whole neurons/channels (Torch-Pruning); the layers physically shrink."""
    entry = structured_schedule(model, params, header.input_shape, env.finetuner(params.finetune, "prune.finetune"))
    return model, header.with_transform(**entry).model_copy(update={"storage": SPARSE})
