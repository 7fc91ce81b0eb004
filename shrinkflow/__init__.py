"""shrinkflow: declarative, reproducible model compression.

``shrinkflow.load(path)`` loads any model file the pipeline writes (see ``shrinkflow.loading``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load"]
__version__ = "0.1.0"


def load(path: Any, allow: Any = ()) -> Any:
    """Load a model file (``.pt`` or packed ``.sfz``) for inference; see ``shrinkflow.loading.load``."""
    from shrinkflow.loading import load as _load

    return _load(path, allow)
