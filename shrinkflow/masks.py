"""Which weights pruning acts on, and keeping pruned weights at zero while a model trains.

The lowest floor of the compression library: the model-file layer (``artifacts``)
keeps a masked variant's zeros with these helpers, and every pruning method uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Layers whose ``weight`` pruning and weight sharing act on.
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Recurrent layers: their input and recurrent matrices (``weight_ih_l0``, ``weight_hh_l0``, ...) are prunable.
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
#: Layers holding weight matrices under names of their own: recurrent layers, and the packed
#: input projections of ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear already).
MATRICES = (*RECURRENT, nn.MultiheadAttention)


def weight_names(mod: nn.Module) -> list[str]:
    """Names of ``mod``'s own prunable weight matrices (``weight`` for Linear/Conv); biases never."""
    if isinstance(mod, WEIGHTED):
        return ["weight"]
    if isinstance(mod, RECURRENT):
        return [n for n in mod._flat_weights_names if n.startswith("weight_")]
    if isinstance(mod, nn.MultiheadAttention):
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [n for n in names if getattr(mod, n, None) is not None]
    return []


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights pruning may zero, by state-dict key: the weight of Linear and Conv layers, the
    input and recurrent matrices of LSTM/GRU/RNN layers, the input projections of nn.MultiheadAttention."""
    out = {}
    for name, mod in model.named_modules():
        for w in weight_names(mod):
            out[f"{name}.{w}" if name else w] = getattr(mod, w)
    return out


def layer_name(weight_key: str) -> str:
    """The name patterns match for a prunable weight: ``net.1.weight`` → ``net.1`` (its module);
    other weights keep their attribute (``rnn.weight_hh_l0``)."""
    return "" if weight_key == "weight" else weight_key.removesuffix(".weight")


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
