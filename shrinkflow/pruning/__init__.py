"""Pruning methods: one typed entry point per ``prune.method``, registered in ``PRUNERS``.

``magnitude`` and ``random`` zero single weights (``magnitude.MASKERS`` score and
mask them; the schedule fine-tunes with the zeros kept); ``variational`` learns
which weights to zero (sparse variational dropout, ``variational``); ``structured``
removes whole neurons and channels (``structured.StructuredPruner``, Torch-Pruning).
``dead.remove_dead_units`` then takes out the units any of them left without weights.
Every entry point is ``(model, header, params, env) -> (model, header)``
(``shrinkflow.methods``).

Importing this package registers the ``sparse`` storage and the ``structured``
transform with ``shrinkflow.artifacts``.
"""

from __future__ import annotations

from schemas.params import PruneParams
from shrinkflow.methods import Method
from shrinkflow.pruning import storage, structured  # noqa: F401 - registers the storage and transform
from shrinkflow.pruning.dead import remove_dead_units
from shrinkflow.pruning.schedule import prune_structured, prune_unstructured
from shrinkflow.pruning.variational import prune_variational

#: ``prune.method`` → entry point (model, header, params, env) -> (model, header).
PRUNERS: dict[str, Method[PruneParams]] = {
    "magnitude": prune_unstructured,
    "random": prune_unstructured,
    "structured": prune_structured,
    "variational": prune_variational,
}

__all__ = ["PRUNERS", "remove_dead_units"]
