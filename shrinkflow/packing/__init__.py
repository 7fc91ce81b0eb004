"""Packed model files (``.sfz``): Deep Compression's storage, loaded without any training code.

``pack_model(model, header, path)`` writes one; ``shrinkflow.load(path)`` reads it
(``shrinkflow.loading`` recognises the magic bytes). See ``docs/packing.md``.
"""

from schemas.paths import PACKED_SUFFIX as SUFFIX
from shrinkflow.packing.codec import CATEGORIES, PackReport, decode_state, load_packed, pack_model, read_packed, render
from shrinkflow.packing.container import MAGIC, VERSION, PackedFormatError, is_packed

__all__ = [
    "CATEGORIES",
    "MAGIC",
    "SUFFIX",
    "VERSION",
    "PackReport",
    "PackedFormatError",
    "is_packed",
    "load_packed",
    "decode_state",
    "pack_model",
    "read_packed",
    "render",
]
