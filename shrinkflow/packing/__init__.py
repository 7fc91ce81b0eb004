"""Packed model files (``.sfz``): Deep Compression's storage, loaded without any training code.

``pack_model(model, header, path)`` writes one; ``shrinkflow.load(path)`` reads it
(the loader recognises the magic bytes). See ``docs/packing.md``.
"""

from shrinkflow.packing.codec import PackReport, load_packed, pack_file, pack_model, read_packed
from shrinkflow.packing.container import MAGIC, VERSION, PackedFormatError, is_packed
from shrinkflow.paths import PACKED_SUFFIX as SUFFIX

__all__ = [
    "MAGIC",
    "SUFFIX",
    "VERSION",
    "PackReport",
    "PackedFormatError",
    "is_packed",
    "load_packed",
    "pack_file",
    "pack_model",
    "read_packed",
]
