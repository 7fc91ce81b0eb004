"""Which weights pruning acts on, and keeping pruned weights at zero while a model trains.

The lowest floor of the compression library: the model-file layer (``artifacts``)
keeps a masked variant's zeros with these helpers, and every pruning method uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Layers whose weights pruning and weight sharing act on.
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights pruning may zero: weight matrices/kernels of Linear and Conv layers."""
    return {
        f"{name}.weight" if name else "weight": mod.weight
        for name, mod in model.named_modules()
        if isinstance(mod, WEIGHTED)
    }


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks that keep today's zeros at zero (for training that continues a pruned model)."""
    return {k: (w != 0) for k, w in prunable(model).items()}


def keep_masked(masks: dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """An ``after_step`` hook that re-zeroes pruned weights after each optimizer step."""

    def hook(model: nn.Module) -> None:
        weights = prunable(model)
        with torch.no_grad():
            for k, m in masks.items():
                weights[k].mul_(m.to(weights[k].device))

    return hook


def sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Measured share of zeros among prunable weights: (global, per layer)."""
    weights = prunable(model)
    per = {k: float((w == 0).float().mean()) for k, w in weights.items()}
    n = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return (zeros / n if n else 0.0), per
