"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, ICML 2017): learn which weights to drop.

Each weight ``θ`` of a Linear/Conv layer gets a Gaussian posterior ``N(θ, σ²)``
with its own ``log σ²`` (the paper's additive reparameterization); its dropout rate
is ``α = σ²/θ²``. Training maximises the variational lower bound: the data term
(cross-entropy, or the teacher's soft targets) plus ``KL / N`` weighted by
``kl_weight`` and warmed up linearly, with the paper's approximation of the KL
divergence to the log-uniform prior,

    −KL ≈ k1·sigmoid(k2 + k3·log α) − ½·log(1 + 1/α) − k1,  k1, k2, k3 = 0.63576, 1.87320, 1.48695.

The forward pass in training samples pre-activations, not weights (the local
reparameterization trick): ``y = x·θ' + ε·sqrt(x²·σ² + 1e-8)`` with ``θ'`` the weights
whose ``log α`` is below the threshold (the authors' ``train_clip``) and ``σ²`` of all
weights; convolutions likewise. Evaluation uses ``θ'`` deterministically. ``log α``
is clipped to [−10, 10] as in the authors' PyTorch notebook.

At the end the weights with ``log α ≥ threshold`` (3: dropout rate above 95 %)
become exact zeros, ``log σ²`` is dropped and each layer is an ordinary
``nn.Linear``/``nn.Conv*`` again; BatchNorm statistics are recomputed for the
deterministic weights (training gathered them on noisy pre-activations). The result
is a masked model like magnitude pruning's, which every later stage (kmeans,
dynamic, static, distill, pack, ONNX) handles.

Why our own: no maintained library implements it (the authors' code is a Lasagne/
Theano repository and a course notebook); this follows that code
(github.com/bayesgroup/variational-dropout-sparsifies-dnn, nets/layers.py; and
github.com/senya-ashukha/sparse-vd-pytorch) on top of the shared training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from schemas.prune import VariationalPrune
from shrinkflow.artifacts import ModelHeader
from shrinkflow.masks import WEIGHTED
from shrinkflow.methods import Env
from shrinkflow.pruning.magnitude import check_patterns
from shrinkflow.pruning.storage import NAME as SPARSE

log = logging.getLogger("shrinkflow")

K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: log α is clipped to ±this (the authors' PyTorch notebook).
LOG_ALPHA_CLIP = 10.0


def _log_alpha(self: nn.Module) -> torch.Tensor:
    return torch.clamp(self.log_sigma2 - torch.log(self.weight * self.weight + 1e-8), -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)


def _kl(self: nn.Module) -> torch.Tensor:
    """The KL divergence of this layer's weights to the log-uniform prior (the paper's approximation), summed."""
    la = self.log_alpha()
    return -(K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1).sum()


def _apply(self: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(self, nn.Linear):
        return F.linear(x, weight, bias)
    return self._conv_forward(x, weight, bias)


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kept = self.weight * (self.log_alpha() < self.vd_threshold).to(self.weight.dtype)
    mean = _apply(self, x, kept, self.bias)
    if not self.training:
        return mean
    var = _apply(self, x * x, torch.exp(self.log_sigma2), None)
    return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)


@functools.cache
def _variational_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (e.g. nn.Linear) trained with sparse variational dropout."""
    return type(
        f"Variational{base.__name__}",
        (base,),
        {"forward": _forward, "log_alpha": _log_alpha, "kl": _kl, "__module__": __name__},
    )


def make_variational(mod: nn.Module, init_log_sigma2: float, threshold: float) -> None:
    """Give a Linear/Conv layer a ``log σ²`` per weight, in place (the weights are the posterior means)."""
    mod.__class__ = _variational_class(type(mod))
    mod.register_parameter("log_sigma2", nn.Parameter(torch.full_like(mod.weight, init_log_sigma2)))
    mod.vd_threshold = threshold


def finalize(mod: nn.Module) -> int:
    """Zero the weights whose log α reaches the threshold, drop ``log σ²``, restore the plain layer; return how many were zeroed."""
    with torch.no_grad():
        drop = mod.log_alpha() >= mod.vd_threshold
        mod.weight.masked_fill_(drop, 0.0)
    del mod._parameters["log_sigma2"]
    del mod.vd_threshold
    mod.__class__ = type(mod).__mro__[1]
    return int(drop.sum())


def variational_layers(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """The Linear/Conv layers to train variationally: all but the ``skip`` patterns.

    An ``nn.MultiheadAttention``'s ``out_proj`` is left out: the attention reads its weight
    directly instead of calling it, so its noise would never reach training. LSTM/GRU
    matrices and attention input projections are not covered (they stay as they are).
    """
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED) and id(m) not in inside_attention}
    check_patterns(list(layers), {}, skip)
    return {n: m for n, m in layers.items() if not any(fnmatchcase(n, p) for p in skip)}


def dropped_share(layers: dict[str, nn.Module]) -> float:
    """Share of the variational layers' weights whose log α is at or above the threshold."""
    with torch.no_grad():
        dropped = sum(int((m.log_alpha() >= m.vd_threshold).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    return dropped / total if total else 0.0


def prune_variational(model: nn.Module, header: ModelHeader, params: VariationalPrune, env: Env) -> tuple[nn.Module, ModelHeader]:
    """``variational``: train sparse variational dropout from ``model`` (in place), then remove the weights above the threshold.

    The header is marked ``masked`` (later training keeps the zeros) and stored
    ``sparse``, as for magnitude pruning.
    """
    splits = env.data("prune")
    n_train = len(splits.X_train)
    layers = variational_layers(model, list(params.skip))
    for mod in layers.values():
        make_variational(mod, params.init_log_sigma2, params.threshold)
    ft = params.finetune
    warmup_steps = params.kl_warmup * ft.epochs * math.ceil(n_train / ft.batch_size)
    step = [0]

    def kl_weight() -> float:
        return params.kl_weight * (min(1.0, step[0] / warmup_steps) if warmup_steps else 1.0)

    def penalty() -> torch.Tensor:
        return kl_weight() / n_train * sum(m.kl() for m in layers.values())

    def after_step(_: nn.Module) -> None:
        step[0] += 1

    def on_epoch(row: dict[str, float]) -> None:
        row = {**row, "sparsity": dropped_share(layers), "kl_weight": kl_weight()}
        log.info("prune variational: %.2f %% of the weights above log alpha %g", 100 * row["sparsity"], params.threshold)
        if env.on_epoch is not None:
            env.on_epoch(row)

    finetune = dataclasses.replace(env, on_epoch=on_epoch).finetuner(ft, "prune.finetune", penalty)
    finetune(model, ft.epochs, after_step)
    removed = sum(finalize(m) for m in layers.values())
    # BatchNorm's running statistics were gathered on the noisy pre-activations of training (local
    # reparameterization); the deterministic model needs its own: one pass over the training split
    # (torch's helper for the same problem after weight averaging; it does nothing without BatchNorm).
    X_train = splits.tensors("train")[0]
    update_bn((X_train[i : i + ft.batch_size] for i in range(0, len(X_train), ft.batch_size)), model, device=env.device)
    total = sum(m.weight.numel() for m in layers.values())
    log.info("prune variational: removed %d of %d weights (%.1f×)", removed, total, total / max(1, total - removed))
    return model.eval(), header.model_copy(update={"masked": True, "storage": SPARSE})
