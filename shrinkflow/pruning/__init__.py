"""Pruning methods: one typed entry point per ``prune.method``, registered in ``PRUNERS``.

``magnitude`` and ``random`` zero single weights (``magnitude.MASKERS`` score and
mask them; the schedule fine-tunes with the zeros kept); ``structured`` removes
whole neurons and channels (``structured.StructuredPruner``, Torch-Pruning).
Every entry point is ``(model, header, params, env) -> (model, header)``
(``shrinkflow.methods``).

Importing this package registers the ``sparse`` storage and the ``structured``
transform with ``shrinkflow.artifacts``.
"""

from __future__ import annotations

from schemas.params import PruneParams
from shrinkflow.methods import Method
from shrinkflow.pruning import storage, structured  # noqa: F401 - registers the storage and transform
from shrinkflow.pruning.schedule import prune_structured, prune_unstructured

#: ``prune.method`` → entry point (model, header, params, env) -> (model, header).
PRUNERS: dict[str, Method[PruneParams]] = {
    "magnitude": prune_unstructured,
    "random": prune_unstructured,
    "structured": prune_structured,
}

__all__ = ["PRUNERS"]
