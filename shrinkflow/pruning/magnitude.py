"""Unstructured L1-magnitude pruning, global or per layer.

We compute masks ourselves instead of calling ``torch.nn.utils.prune``: that module
reparametrises weights into ``weight_orig`` + ``weight_mask`` (a state dict twice
the size, with hooks) while we want plain zeros in a plain state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _threshold(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * values.numel()))
    if k == 0:
        return values.new_tensor(-1.0)
    return values.kthvalue(k).values


def magnitude_prune(model: nn.Module, params: Any) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude weights in place; return the masks (True = kept)."""
    from shrinkflow.pruning import prunable

    weights = prunable(model)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if params.scope == "global":
            t = _threshold(torch.cat([w.abs().flatten() for w in weights.values()]), params.sparsity)
            for k, w in weights.items():
                masks[k] = w.abs() > t
        else:
            for k, w in weights.items():
                masks[k] = w.abs() > _threshold(w.abs().flatten(), params.sparsity)
        for k, w in weights.items():
            w.mul_(masks[k])
    return masks
