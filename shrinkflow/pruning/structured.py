"""Structured pruning: remove whole neurons, channels, hidden units and attention heads with Torch-Pruning.

Torch-Pruning traces the model into a dependency graph, so removing a channel also
removes what consumes it (the next layer's inputs, BatchNorm entries, the other
branch of a residual add, a depthwise convolution's matching channels).
``sparsity`` here is the fraction of each group's channels removed (``scope:
layer``), or of all channels ranked together (``scope: global``); the layers
become physically smaller. What each kind of layer loses:

- Linear / Conv (depthwise and residual groups included): output channels;
- LSTM / GRU: hidden units (``RecurrentPruner``, ours: see there why);
- attention with a fused ``qkv`` projection (``arch: transformer``, timm's ViT):
  whole heads (``qkv`` outputs and ``proj`` inputs), and the MLP's hidden width.
  The embedding (residual) width stays: groups that reach a LayerNorm are left out.

The saved file stays loadable from the file alone, without unpickling: the header
gets a ``structured`` transform holding Torch-Pruning's pruning history
(layer names and removed indices, plain JSON); loading builds the original
architecture, traces it and replays the history, then loads the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from schemas.prune import StructuredPrune
from shrinkflow.artifacts import ModelHeader, Transform, register_transform
from shrinkflow.errors import ParamsError
from shrinkflow.masks import RECURRENT, WEIGHTED
from shrinkflow.models import forward_with_hooks
from shrinkflow.pruning.magnitude import check_patterns

#: The header transform, named after the method.
KIND = "structured"
#: Layers whose output channels (hidden units) a group can be rooted at.
_ROOTS = (*WEIGHTED, *RECURRENT)


def example_input(input_shape: list[int]) -> torch.Tensor:
    """A batch of one zero input: all tracing needs (shapes, not values)."""
    return torch.zeros(1, *input_shape)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layer run last: its outputs are the model's, so it must keep its size."""
    order: list[nn.Module] = []
    weighted = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    forward_with_hooks(model.eval(), example, weighted, lambda mod, i, o: order.append(mod))
    return order[-1:]


def refusal(model: nn.Module) -> str | None:
    """Why ``structured`` cannot prune ``model`` (None when it can)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            return (
                f"prune.method structured: {name} (nn.MultiheadAttention): Torch-Pruning 1.6 can only narrow its "
                "embedding, not remove whole heads; use prune.method magnitude or random, or write the attention with "
                "a fused qkv Linear as arch: transformer does (heads are then removed)"
            )
        if isinstance(m, RECURRENT) and (m.bidirectional or getattr(m, "proj_size", 0)):
            return (
                f"prune.method structured: {name} ({type(m).__name__}) is bidirectional or projected; hidden units are "
                "removed only from unidirectional layers without proj_size: use prune.method magnitude or random"
            )
    return None


class RecurrentPruner:
    """Removes hidden units from an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (every layer of it).

    Our own, because Torch-Pruning 1.6.1's ``LSTMPruner`` slices ``weight_hh`` with
    the unit indices not repeated per gate (a shape mismatch), handles one layer
    only, and there is none for GRU (Torch-Pruning issue #44). Torch-Pruning still
    traces the dependencies (the layer consuming the hidden state loses the same
    inputs); this class only cuts the weights. A unit removed is removed in every
    layer of the module (``hidden_size`` is one number for all of them); its
    importance sums over the layers (``RecurrentImportance``).
    """

    @staticmethod
    def gates(layer: nn.Module) -> int:
        return {"LSTM": 4, "GRU": 3}.get(layer.mode, 1)

    def _keep(self, n: int, idxs: Sequence[int]) -> list[int]:
        drop = set(int(i) for i in idxs)
        return [i for i in range(n) if i not in drop]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        h, g = layer.hidden_size, self.gates(layer)
        keep = torch.tensor(self._keep(h, idxs), dtype=torch.long)
        rows = torch.cat([keep + i * h for i in range(g)])
        for name in layer._flat_weights_names:
            w = getattr(layer, name)
            w = w.detach().index_select(0, rows)
            if name.startswith("weight_hh") or (name.startswith("weight_ih") and not name.startswith("weight_ih_l0")):
                w = w.index_select(1, keep)
            setattr(layer, name, nn.Parameter(w.contiguous()))
        layer.hidden_size = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = torch.tensor(self._keep(layer.input_size, idxs), dtype=torch.long)
        w = layer.weight_ih_l0
        layer.weight_ih_l0 = nn.Parameter(w.detach().index_select(1, keep).contiguous())
        layer.input_size = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size


def _customized() -> dict[type, Any]:
    """Torch-Pruning's pruner interface around ``RecurrentPruner``, for each recurrent layer type."""
    import torch_pruning as tp

    class _Pruner(RecurrentPruner, tp.pruner.BasePruningFunc):
        pass

    return {t: _Pruner() for t in RECURRENT}


def _importance(norm: int) -> Any:
    """Torch-Pruning's group magnitude importance, which also scores recurrent hidden units."""
    import torch_pruning as tp

    class RecurrentImportance(tp.importance.GroupMagnitudeImportance):
        """A hidden unit's score: the p-norm of every weight it owns (its gate rows in the input and
        recurrent matrices of every layer, its recurrent and next-layer input columns)."""

        def __call__(self, group: Any) -> torch.Tensor | None:
            imp, where = [], []
            for i, (dep, idxs) in enumerate(group):
                layer, fn = dep.layer, dep.pruning_fn
                if isinstance(layer, RECURRENT) and isinstance(getattr(fn, "__self__", None), RecurrentPruner):
                    if fn.__name__ == "prune_out_channels":
                        score = _unit_scores(layer, self.p)
                    else:
                        score = layer.weight_ih_l0.detach().abs().pow(self.p).sum(0)
                    imp.append(score[idxs])
                    where.append(group[i].root_idxs)
            base = super().__call__(group)  # the Linear/Conv/norm layers of the group, reduced and normalized
            if not imp:
                return base
            rnn = self._normalize(self._reduce(imp, where), self.normalizer)
            return rnn if base is None else base + rnn

    return RecurrentImportance(p=norm)


def _unit_scores(layer: nn.Module, p: int) -> torch.Tensor:
    h, g = layer.hidden_size, RecurrentPruner.gates(layer)
    score = torch.zeros(h)
    for name in layer._flat_weights_names:
        w = getattr(layer, name).detach().abs().pow(p)
        score += w.reshape(g, h, *w.shape[1:]).sum(0).reshape(h, -1).sum(1)
        if name.startswith("weight_hh") or (name.startswith("weight_ih") and not name.startswith("weight_ih_l0")):
            score += w.sum(0)
    return score


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """{fused qkv Linear: number of heads} of every attention written like ``models.Attention`` or timm's."""
    out = {}
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear):
            if isinstance(getattr(m, "head_dim", None), int) and m.head_dim > 0:
                out[qkv] = qkv.out_features // (3 * m.head_dim)
            elif isinstance(getattr(m, "num_heads", None), int):
                out[qkv] = m.num_heads
    return out


def _sync_heads(model: nn.Module) -> None:
    """After heads were removed: attention modules that keep a ``num_heads`` count get the new one."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int):
            m.num_heads = qkv.out_features // (3 * m.head_dim)


def _residual_roots(model: nn.Module, example: torch.Tensor, customized: dict[type, Any]) -> list[nn.Module]:
    """Layers rooting a group that reaches a LayerNorm: a Transformer's embedding width, which stays."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=customized, verbose=False)
    roots = []
    for group in dg.get_all_groups(root_module_types=list(_ROOTS)):
        if any(isinstance(dep.target.module, nn.LayerNorm) for dep, _ in group):
            roots += [dep.target.module for dep, _ in group if isinstance(dep.target.module, _ROOTS) and dg.is_out_channel_pruning_fn(dep.handler)]
    return roots


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

        why = refusal(model)
        if why:
            raise ParamsError(why)
        self.model = model
        self.input_shape = list(input_shape)
        ex = example_input(self.input_shape)
        modules = {name: m for name, m in model.named_modules() if isinstance(m, _ROOTS)}
        layers, skip = dict(params.layers), list(params.skip)
        check_patterns(list(modules), layers, skip)
        customized = _customized()
        heads = attention_heads(model)
        ignored = output_layers(model, ex) + [m for n, m in modules.items() if any(fnmatchcase(n, p) for p in skip)]
        if heads:
            ignored += _residual_roots(model, ex, customized)
        ratio_dict: dict[nn.Module, float] = {}
        for n, m in modules.items():
            hits = [p for p in layers if fnmatchcase(n, p)]
            if hits and m not in ignored:
                ratio_dict[m] = float(layers[hits[-1]])
        with warnings.catch_warnings():
            # Torch-Pruning notes parameters outside any layer (a ViT's position embedding) and prunes
            # their last dimension, the embedding width, which stays here anyway.
            warnings.filterwarnings("ignore", message=r"Unwrapped parameters detected")
            self.pruner = tp.pruner.MetaPruner(
                model,
                ex,
                importance=_importance(params.norm),
                pruning_ratio=params.sparsity,
            pruning_ratio_dict=ratio_dict or None,
                global_pruning=params.scope == "global",
                max_pruning_ratio=params.max_layer_sparsity,
                iterative_steps=steps,
                ignored_layers=ignored,
                customized_pruners=customized,
                root_module_types=list(_ROOTS),
                **({} if not heads else {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                                         "head_pruning_ratio": params.sparsity}),
                **({} if ramp is None else {"iterative_pruning_ratio_scheduler": _scheduler(ramp)}),
            )

    def step(self) -> None:
        """Remove the next share of channels (in place: the model's layers shrink)."""
        self.pruner.step()
        _sync_heads(self.model)

    def entry(self) -> dict[str, Any]:
        """The header transform that replays every step so far on the original architecture."""
        history = [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in self.pruner.pruning_history()]
        return {"kind": KIND, "history": history}


def _scheduler(ramp: Callable[[int, int], float]) -> Callable[[float, int], list[float]]:
    """A Torch-Pruning ratio scheduler: each layer's ratio after step i of n is ``ratio · ramp(i, n)``."""

    def scheduler(ratio: float, steps: int) -> list[float]:
        return [ratio * ramp(i, steps) for i in range(steps + 1)]

    return scheduler


def dependency_graph(model: nn.Module, input_shape: list[int]) -> Any:
    """Torch-Pruning's dependency graph of ``model`` (recurrent layers through ``RecurrentPruner``), as
    every removal here is recorded and replayed."""
    import torch_pruning as tp

    # Torch-Pruning traces with autograd: loading inside torch.no_grad() must work too.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(
            model.eval(), example_inputs=example_input(input_shape), customized_pruners=_customized(), verbose=False
        )


def _rebuild(model: nn.Module, entry: dict[str, Any], header: ModelHeader) -> nn.Module:
    dg = dependency_graph(model, header.input_shape)
    dg.load_pruning_history([(name, bool(out), list(idxs)) for name, out, idxs in entry["history"]])
    _sync_heads(model)
    return model


# A pruned model is an ordinary float model of smaller layers: no to_float needed,
# and training it cannot undo the change, so no constraint either.
register_transform(KIND, Transform(rebuild=_rebuild))
