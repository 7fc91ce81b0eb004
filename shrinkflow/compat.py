"""Which method can compress which model: every refusal found before any training.

``refusals(model, header, prune, quantize)`` asks each chosen method whether it
can work on ``model`` (an untrained instance of the teacher's architecture is
enough: only layer types and the traced graph matter). The train_teacher stage
asks before it trains, so a run that would fail at its quantize stage fails in
seconds, not after the teacher's training. Each method also refuses on entry,
before its own fine-tuning, with the same message: it names the method, the layer
and what to use instead.

The same functions fill the refusal cells of the compatibility matrix
(``docs/models.md``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from shrinkflow.artifacts import ModelHeader
from shrinkflow.errors import ShrinkflowError
from shrinkflow.masks import layer_name, prunable


def prune_refusal(model: nn.Module, header: ModelHeader, params: Any) -> str | None:
    """Why ``params.method`` (a ``prune`` section) cannot prune ``model``; None when it can."""
    if not params.enabled:
        return None
    if not prunable(model):
        return f"prune.method {params.method}: the model has no Linear, Conv, LSTM/GRU or attention weights to prune"
    if params.method in ("magnitude", "random"):
        from shrinkflow.pruning.magnitude import check_patterns

        try:
            check_patterns([layer_name(k) for k in prunable(model)], dict(params.layers), list(params.skip))
        except ShrinkflowError as exc:
            return str(exc)
    if params.method == "variational":
        from shrinkflow.pruning.variational import variational_layers

        try:
            if not variational_layers(model, list(params.skip)):
                return "prune.method variational: the model has no Linear or Conv layer left to train variationally; use magnitude"
        except ShrinkflowError as exc:
            return str(exc)
    if params.method == "structured":
        from shrinkflow.pruning.structured import StructuredPruner

        try:  # traces the dependency graph, as pruning will
            StructuredPruner(copy.deepcopy(model), params, header.input_shape)
        except ShrinkflowError as exc:
            return str(exc)
        except Exception as exc:  # Torch-Pruning failing to trace a user module
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return (
                f"prune.method structured: Torch-Pruning cannot trace this model ({type(exc).__name__}: {first}); "
                "use prune.method magnitude or random"
            )
    return None


def quantize_refusal(model: nn.Module, header: ModelHeader, params: Any) -> str | None:
    """Why ``params.method`` (a ``quantize`` section) cannot quantize ``model``; None when it can."""
    if not params.enabled:
        return None
    if params.method == "dynamic":
        from shrinkflow.quantization.dynamic import refusal

        return refusal(model)
    if params.method in ("static", "qat"):
        from shrinkflow.quantization.static import capture

        try:  # what quantizing will do first: capture the graph
            capture(copy.deepcopy(model), torch.zeros(2, *header.input_shape), params.method)
        except ShrinkflowError as exc:
            return str(exc)
    if params.method == "kmeans":
        from shrinkflow.quantization.kmeans import shareable_layers

        if not prunable(model):
            return "quantize.method kmeans: the model has no Linear, Conv, LSTM/GRU or attention weights to share"
        try:
            shareable_layers(model, params.bits, dict(params.layer_bits))
        except ShrinkflowError as exc:
            return str(exc)
    return None


def refusals(model: nn.Module, header: ModelHeader, prune: Any, quantize: Any) -> list[str]:
    """Every refusal of the run's prune and quantize methods for ``model`` (empty when all can work)."""
    return [why for why in (prune_refusal(model, header, prune), quantize_refusal(model, header, quantize)) if why]
