"""The packed file's container: magic, version, metadata as JSON, payload, checksum.

Layout (little-endian)::

    0   8 bytes  magic  b"\\x89SFZ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode copies)
    8   u16      format version
    10  u16      flags (0)
    12  u32      length of the metadata (zlib-compressed UTF-8 JSON)
    16  u32      length of the payload
    20  ...      metadata, then payload (the tensors' sections, addressed by offset)
    end u32      CRC-32 of every byte before it

The metadata is plain JSON (the ``ModelHeader`` and one entry per tensor) read with
``json.loads``: loading never runs code from the file.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from shrinkflow.errors import InputError
from shrinkflow.io import PACKED_MAGIC as MAGIC
from shrinkflow.io import model_file_kind
VERSION = 1
_FIXED = struct.Struct("<8sHHII")
#: Bytes of every file that hold no model data: fixed header + CRC.
FIXED_OVERHEAD = _FIXED.size + 4


class PackedFormatError(InputError):
    """A packed model file is truncated, corrupt, or from a newer shrinkflow."""


def is_packed(path: str | Path) -> bool:
    """True when ``path`` starts with the packed format's magic bytes."""
    return model_file_kind(path) == "sfz"


def encode(meta: dict[str, Any], payload: bytes) -> tuple[bytes, int]:
    """The whole file as bytes, and the size of its compressed metadata."""
    meta_bytes = zlib.compress(json.dumps(meta, separators=(",", ":")).encode("utf-8"), 9)
    head = _FIXED.pack(MAGIC, VERSION, 0, len(meta_bytes), len(payload))
    body = head + meta_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body)), len(meta_bytes)


def decode(data: bytes, where: str) -> tuple[dict[str, Any], memoryview]:
    """Check and split a packed file; raise ``PackedFormatError`` naming the problem."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise PackedFormatError(f"{where} is not a packed shrinkflow model (magic bytes missing)")
    if len(data) < _FIXED.size:
        raise PackedFormatError(f"{where} is truncated: {len(data)} bytes, shorter than the {_FIXED.size}-byte header")
    _, version, _flags, meta_len, payload_len = _FIXED.unpack_from(data)
    if version > VERSION:
        raise PackedFormatError(
            f"{where} is packed format version {version}, newer than this shrinkflow reads (≤ {VERSION}): upgrade shrinkflow"
        )
    if version < 1:
        raise PackedFormatError(f"{where}: invalid packed format version {version} (file corrupt)")
    expected = _FIXED.size + meta_len + payload_len + 4
    if len(data) < expected:
        raise PackedFormatError(f"{where} is truncated: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected:
        raise PackedFormatError(f"{where} is corrupt: {len(data) - expected} unexpected bytes after the checksum")
    (crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(memoryview(data)[: expected - 4]) != crc:
        raise PackedFormatError(f"{where} is corrupt: CRC-32 checksum mismatch (the file changed after it was written)")
    try:
        meta = json.loads(zlib.decompress(data[_FIXED.size : _FIXED.size + meta_len]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:  # pragma: no cover - CRC catches this first
        raise PackedFormatError(f"{where} is corrupt: unreadable metadata ({exc})") from exc
    start = _FIXED.size + meta_len
    return meta, memoryview(data)[start : start + payload_len]
