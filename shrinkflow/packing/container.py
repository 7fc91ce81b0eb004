"""The packed file's container: magic, version, metadata, payload, checksum.

Layout (little-endian)::

    0   8 bytes  magic  b"\\x89SFZ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode copies)
    8   u16      format version
    10  u16      flags (0)
    12  u32      length of the metadata
    16  u32      length of the payload
    20  ...      metadata, then payload
    end u32      CRC-32 of every byte before it

The metadata is UTF-8 JSON (the ``ModelHeader`` and what the payload holds), read
with ``json.loads``: loading never runs code from the file. Version 1 compresses it
with zlib and lists every tensor in it; version 2 (``VERSION``) compresses it as raw
deflate primed with :data:`ZDICT` (the words every header repeats cost almost
nothing) and moves the tensor table and long number lists into the payload
(``codec``). Both are read.
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

VERSION = 2
_FIXED = struct.Struct("<8sHHII")
#: Bytes of every file that hold no model data: fixed header + CRC.
FIXED_OVERHEAD = _FIXED.size + 4

#: Preset dictionary of version-2 metadata: JSON fragments the header of a shrinkflow
#: model repeats. Part of the format: a later version may change it, version 2 never.
ZDICT = (
    b'{"h":{"spec":{"arch":"module","import":"","kwargs":{}},"spec":{"arch":"lenet5","padding":null},'
    b'"spec":{"arch":"mlp","hidden":[300,100]},"input_shape":[1,28,28],"input_shape":[1,8,8],"out_features":10,'
    b'"task":"regression","task":"classification","transforms":[{"kind":"static","per_channel":true,"bits":8,'
    b'{"kind":"qat",{"kind":"dynamic"},{"kind":"structured","history":[["features.0",true,null],'
    b'["features.2",true,null],["classifier.1",true,null],["net.1",true,null],["net.3",true,null]]},'
    b'{"kind":"kmeans","layers":{"features.0":8,"features.2":8,"classifier.1":5,"classifier.3":5,'
    b'"net.1":6,"net.3":6,"net.5":6}}],"storage":"sparse","storage":"dense","masked":false,"masked":true},'
    b'"q":[{"module":"net.1","dtype":"qint8","scheme":"per_channel","axis":0,"scales":null,"zero_points":null},'
    b'{"scheme":"per_tensor","scale":0.01,"zero_point":0}],"l":[["transforms",0,"history",0,2]]}'
)


class PackedFormatError(InputError):
    """A packed model file is truncated, corrupt, or from a newer shrinkflow."""


def is_packed(path: str | Path) -> bool:
    """True when ``path`` starts with the packed format's magic bytes."""
    return model_file_kind(path) == "sfz"


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    return c.compress(data) + c.flush()


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj(-15, ZDICT)
    out = d.decompress(data) + d.flush()
    if not d.eof:
        raise zlib.error("metadata stream ends early")
    return out


def encode(meta: dict[str, Any], payload: bytes) -> tuple[bytes, int]:
    """The whole version-2 file as bytes, and the size of its compressed metadata."""
    meta_bytes = _deflate(json.dumps(meta, separators=(",", ":")).encode("utf-8"))
    head = _FIXED.pack(MAGIC, VERSION, 0, len(meta_bytes), len(payload))
    body = head + meta_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body)), len(meta_bytes)


def decode(data: bytes, where: str) -> tuple[int, dict[str, Any], memoryview]:
    """Check and split a packed file: (format version, metadata, payload).

    Raises:
        PackedFormatError: naming the problem (not ours, truncated, corrupt, newer version).
    """
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
    raw = data[_FIXED.size : _FIXED.size + meta_len]
    try:
        text = zlib.decompress(raw) if version == 1 else _inflate(raw)
        meta = json.loads(text.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:  # pragma: no cover - CRC catches this first
        raise PackedFormatError(f"{where} is corrupt: unreadable metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise PackedFormatError(f"{where} is corrupt: its metadata is not a JSON object")
    start = _FIXED.size + meta_len
    return version, meta, memoryview(data)[start : start + payload_len]


# -- the version-2 tensor table: unsigned LEB128 varints and bytes ------------------


class Writer:
    """Appends bytes and unsigned varints (LEB128: 7 bits per byte, small numbers in one byte)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> None:
        self.buf.append(v)

    def uint(self, v: int) -> None:
        if v < 0:
            raise ValueError(f"varint of a negative number {v}")
        while v >= 0x80:
            self.buf.append((v & 0x7F) | 0x80)
            v >>= 7
        self.buf.append(v)


class Reader:
    """Reads what ``Writer`` wrote; ValueError on anything that runs past the end."""

    def __init__(self, data: memoryview | bytes) -> None:
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("the tensor table ends early")
        v = self.data[self.pos]
        self.pos += 1
        return int(v)

    def uint(self) -> int:
        v, shift = 0, 0
        while True:
            b = self.u8()
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7
            if shift > 63:
                raise ValueError("a varint in the tensor table is too long")
