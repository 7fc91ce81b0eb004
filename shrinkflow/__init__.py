"""shrinkflow: declarative, reproducible model compression."""

from shrinkflow.artifacts import load

__all__ = ["load"]
__version__ = "0.1.0"
