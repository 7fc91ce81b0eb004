"""Deep Compression's storage (Han et al. 2016) for any shrinkflow model.

For every tensor of the model's float state dict (``artifacts.to_float``: the same
function, float weights, structurally pruned layers already at their smaller
shapes) the packer finds the structure itself and keeps the smallest of:

* **dense**: every value stored;
* **sparse**: only non-zeros, their positions written as relative indices (the gap
  since the previous non-zero) of width ``b``; a gap too long for ``b`` bits is
  bridged by an escape symbol ``2^b - 1`` that skips ``2^b - 1`` positions (Han et
  al. store a filler zero there; the escape skips the filler's weight index too).

and for the stored values, the smallest of:

* **codebook**: at most 256 distinct values (weight sharing: kmeans clusters) as a
  table plus one index per value; int8 weights of torch.ao quantized layers are
  stored as their integers the same way (plus their scales), even per-channel;
* **raw**: int8 or float16 when that is exact, else the tensor's own dtype.

Index and position streams are Huffman-coded when that beats fixed width. Every
choice is lossless: the loaded model computes exactly what the packed one did.
int8 weights (torch.ao dynamic layers, pt2e static/QAT graphs, FX files) are
re-quantized on load with their stored scales, so their integers are the same too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import shrinkflow.pruning  # noqa: F401 - registers the transforms a header may name
import shrinkflow.quantization  # noqa: F401
from shrinkflow.artifacts import ModelHeader, build_and_load, float_index, from_float, to_float
from shrinkflow.errors import InputError
from shrinkflow.io import atomic_path
from shrinkflow.packing import container, huffman
from shrinkflow.packing.container import PackedFormatError

#: Most distinct values a codebook may hold (8-bit indices before entropy coding).
MAX_CODEBOOK = 256
#: Largest tensor a packed file may announce (the architecture check comes first; this bounds the rest).
MAX_TENSOR = 2**28
#: Relative-index widths tried for sparse positions.
INDEX_WIDTHS = (2, 3, 4, 5, 6, 8)
CATEGORIES = ("indices", "codebooks", "positions", "values", "overhead")


@dataclass
class PackReport:
    """What was written: total size, its breakdown, and how each tensor was stored."""

    path: str
    size_bytes: int
    breakdown: dict[str, int]
    tensors: list[dict[str, Any]] = field(default_factory=list)


class _Payload:
    """Concatenated sections, with the bytes spent per category.

    ``base``: where this payload's first byte will sit in the file's payload, so a
    candidate encoding written here can be appended (``append``) as it is.
    """

    def __init__(self, base: int = 0) -> None:
        self.base = base
        self.buf = bytearray()
        self.spent = dict.fromkeys(CATEGORIES, 0)

    def add(self, data: bytes, category: str) -> dict[str, int]:
        off = self.base + len(self.buf)
        self.buf += data
        self.spent[category] += len(data)
        return {"off": off, "len": len(data)}

    def append(self, other: _Payload) -> None:
        """Append ``other``, made with ``base`` at this payload's end."""
        assert other.base == self.base + len(self.buf), "a candidate payload must start where this one ends"
        self.buf += other.buf
        for category, n in other.spent.items():
            self.spent[category] += n


# -- streams of small integers ------------------------------------------------------


def _stream_candidates(symbols: np.ndarray, alphabet: int, entropy: bool = True) -> tuple[dict[str, Any], bytes]:
    """The smaller of fixed-width and canonical Huffman coding of ``symbols`` (< alphabet).

    ``entropy=False`` keeps fixed width (to measure what Huffman coding adds).
    """
    n = len(symbols)
    width = max(1, math.ceil(math.log2(max(alphabet, 2))))
    fixed = huffman.pack_fixed(symbols, width)
    best = ({"coding": "fixed", "n": n, "width": width}, fixed)
    if n and entropy:
        lengths, bits = huffman.huffman_encode(symbols, alphabet)
        last = int(np.flatnonzero(lengths).max()) + 1
        table = huffman.pack_fixed(lengths[:last], 4)  # lengths ≤ 15: one nibble each
        if len(table) + len(bits) < len(fixed):
            best = ({"coding": "huffman", "n": n, "symbols": last}, table + bits)
    return best


def _write_stream(p: _Payload, symbols: np.ndarray, alphabet: int, category: str, entropy: bool) -> dict[str, Any]:
    desc, data = _stream_candidates(symbols, alphabet, entropy)
    return {**desc, **p.add(data, category)}


def _section(payload: memoryview, desc: dict[str, Any]) -> bytes:
    off, length = int(desc["off"]), int(desc["len"])
    if off < 0 or length < 0 or off + length > len(payload):
        raise ValueError(f"a section ({off}+{length}) lies outside the payload ({len(payload)} bytes)")
    return bytes(payload[off : off + length])


def _read_stream(payload: memoryview, desc: dict[str, Any], most: int) -> np.ndarray:
    """A stream of at most ``most`` symbols (the tensor's size bounds it: nothing larger is allocated)."""
    if not 0 <= int(desc["n"]) <= most:
        raise ValueError(f"a stream announces {desc['n']} symbols, at most {most} fit the tensor")
    data = _section(payload, desc)
    if desc["coding"] == "fixed":
        if not 1 <= int(desc["width"]) <= 16:
            raise ValueError(f"invalid symbol width {desc['width']}")
        return huffman.unpack_fixed(data, desc["n"], desc["width"])
    k = int(desc["symbols"])
    if not 1 <= k <= 1 << 16:
        raise ValueError(f"invalid Huffman alphabet size {k}")
    table = (k + 1) // 2
    lengths = huffman.unpack_fixed(data[:table], k, 4)
    return huffman.huffman_decode(lengths, data[table:], desc["n"])


# -- positions of non-zeros -----------------------------------------------------------


def relative_indices(positions: np.ndarray, width: int) -> np.ndarray:
    """Gaps between sorted flat positions, with escape symbols for gaps ≥ 2^width - 1."""
    esc = (1 << width) - 1
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)])) - 1
    n_esc = gaps // esc
    rest = gaps % esc
    reps = n_esc + 1
    out = np.repeat(np.full(len(gaps), esc, dtype=np.int64), reps)
    out[np.cumsum(reps) - 1] = rest
    return out


def positions_from_relative(symbols: np.ndarray, width: int) -> np.ndarray:
    """Inverse of ``relative_indices``."""
    esc = (1 << width) - 1
    is_esc = symbols == esc
    advance = np.where(is_esc, esc, symbols + 1)
    return (np.cumsum(advance) - 1)[~is_esc]


# -- values ------------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_raw(data: bytes, dtype: torch.dtype, n: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)[:n].clone()


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.float64, torch.bfloat16)}


def _narrowest(values: torch.Tensor) -> torch.Tensor:
    """``values`` as int8 or float16 when that loses nothing (e.g. int8 weights), else unchanged."""
    if values.numel() and bool((values == values.round()).all()) and values.min() >= -128 and values.max() <= 127:
        return values.to(torch.int8)
    if values.dtype != torch.float16 and bool(torch.equal(values.half().to(values.dtype), values)):
        return values.half()
    return values


def _write_values(p: _Payload, values: torch.Tensor, entropy: bool) -> dict[str, Any]:
    """Store a 1-D float tensor as codebook + indices or raw, whichever is smaller."""
    raw = _narrowest(values)
    raw_size = raw.numel() * raw.element_size()
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    if 0 < len(uniq) <= MAX_CODEBOOK:
        book = _narrowest(uniq)
        idx_desc, idx_data = _stream_candidates(inverse.numpy().astype(np.int64), len(uniq), entropy)
        if book.numel() * book.element_size() + len(idx_data) < raw_size:
            book_ref = p.add(_raw_bytes(book), "codebooks")
            return {
                "kind": "codebook",
                "dtype": str(book.dtype).removeprefix("torch."),
                "k": len(uniq),
                **book_ref,
                "index": {**idx_desc, **p.add(idx_data, "indices")},
            }
    return {"kind": "raw", "dtype": str(raw.dtype).removeprefix("torch."), **p.add(_raw_bytes(raw), "values")}


#: The dtypes a packed file may name (looked up here, never resolved by name on torch).
_FILE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool,
)}


def _dtype(name: str) -> torch.dtype:
    try:
        return _FILE_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}") from None


def _read_values(payload: memoryview, desc: dict[str, Any], n: int) -> torch.Tensor:
    dtype = _dtype(desc["dtype"])
    data = _section(payload, desc)
    if desc["kind"] == "raw":
        if len(data) < n * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"a raw section holds {len(data)} bytes, {n} values need more")
        return _from_raw(data, dtype, n)
    if not 0 < int(desc["k"]) <= MAX_CODEBOOK:
        raise ValueError(f"invalid codebook size {desc['k']}")
    book = _from_raw(data, dtype, desc["k"])
    idx = _read_stream(payload, desc["index"], n)
    if len(idx) != n or (len(idx) and (idx.max() >= desc["k"] or idx.min() < 0)):
        raise ValueError("codebook indices do not match the codebook")
    return book[torch.from_numpy(idx)]


# -- one tensor ----------------------------------------------------------------------


def _positions(p: _Payload, pos: np.ndarray, entropy: bool) -> dict[str, Any]:
    """Write the non-zeros' positions as relative indices of the width whose stream is smallest."""
    best: tuple[int, dict[str, Any], bytes] | None = None
    for w in INDEX_WIDTHS:
        desc, data = _stream_candidates(relative_indices(pos, w), 1 << w, entropy)
        if best is None or len(data) < len(best[2]):
            best = (w, desc, data)
    width, desc, data = best  # type: ignore[misc]
    return {**desc, **p.add(data, "positions"), "width": width}


def _encode_tensor(p: _Payload, name: str, t: torch.Tensor, entropy: bool = True) -> dict[str, Any]:
    t = t.detach().cpu()
    entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    flat = t.reshape(-1)
    if str(t.dtype).removeprefix("torch.") not in _DTYPES:
        entry["layout"] = "dense"
        entry["values"] = {"kind": "raw", "dtype": entry["dtype"], **p.add(_raw_bytes(flat), "values")}
        return entry
    if str(t.dtype).removeprefix("torch.") == "bfloat16":  # torch.unique has no bf16 kernel on CPU
        flat = flat.float()
    nnz = int(torch.count_nonzero(flat))
    # Write each layout into a payload of its own; append the smaller one.
    dense = _Payload(len(p.buf))
    layouts = {"dense": (dense, {"values": _write_values(dense, flat, entropy)})}
    if nnz < flat.numel():
        sparse = _Payload(len(p.buf))
        pos = torch.nonzero(flat, as_tuple=True)[0].numpy()
        layouts["sparse"] = (sparse, {
            "positions": _positions(sparse, pos, entropy),
            "values": _write_values(sparse, flat[torch.from_numpy(pos)], entropy),
        })
    layout = min(layouts, key=lambda k: len(layouts[k][0].buf))
    chosen, desc = layouts[layout]
    p.append(chosen)
    return {**entry, "layout": layout, "nnz": nnz, **desc}


def _decode_tensor(payload: memoryview, entry: dict[str, Any]) -> torch.Tensor:
    shape = [int(d) for d in entry["shape"]]
    n = math.prod(shape)
    if n < 0 or n > MAX_TENSOR:
        raise ValueError(f"tensor {entry.get('name')!r} announces {n} values")
    dtype = _dtype(entry["dtype"])
    if entry["layout"] == "dense":
        return _read_values(payload, entry["values"], n).to(dtype).reshape(shape)
    pdesc = entry["positions"]
    if int(pdesc["width"]) not in INDEX_WIDTHS:
        raise ValueError(f"invalid relative-index width {pdesc['width']}")
    pos = positions_from_relative(_read_stream(payload, pdesc, 2 * n + 1), int(pdesc["width"]))
    if len(pos) and (pos[-1] >= n or pos.min() < 0):
        raise ValueError("non-zero positions fall outside the tensor")
    out = torch.zeros(n, dtype=dtype)
    out[torch.from_numpy(pos)] = _read_values(payload, entry["values"], len(pos)).to(dtype)
    return out.reshape(shape)


# -- quantized modules ---------------------------------------------------------------


def _quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """Quantized weights by float state-dict key: torch.ao int8 modules' ``weight()``, or the
    model's own ``quantized_weights()`` (a pt2e int8 graph, ``quantization.static``)."""
    if callable(getattr(model, "quantized_weights", None)):
        return model.quantized_weights()
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if callable(w) and hasattr(mod, "set_weight_bias"):
            qw = w()
            if isinstance(qw, torch.Tensor) and qw.is_quantized:
                out[f"{name}.weight" if name else "weight"] = qw
    return out


def _qparams(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Scales of the quantized weights, and their integers by float weight key.

    The integers are stored instead of the dequantized floats (≤ 256 distinct values
    per tensor even with per-channel scales); the scales let loading rebuild the
    same floats and re-quantize to the same integers.
    """
    out, ints = [], {}
    for key, qw in _quantized(model).items():
        entry: dict[str, Any] = {"module": key.removesuffix("weight").removesuffix("."), "dtype": str(qw.dtype).removeprefix("torch.")}
        if qw.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            entry.update(scheme="per_tensor", scale=float(qw.q_scale()), zero_point=int(qw.q_zero_point()))
        elif qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            entry.update(
                scheme="per_channel",
                scales=[float(s) for s in qw.q_per_channel_scales()],
                zero_points=[int(z) for z in qw.q_per_channel_zero_points()],
                axis=int(qw.q_per_channel_axis()),
            )
        else:  # pragma: no cover - no other scheme exists in torch.ao today
            continue
        ints[key] = qw.int_repr()
        out.append(entry)
    return out, ints


def _dequantize(ints: torch.Tensor, q: dict[str, Any]) -> torch.Tensor:
    """The float weight torch's ``dequantize()`` gives for these integers and scales."""
    storage = torch.uint8 if q["dtype"] == "quint8" else torch.int8
    ints = ints.to(storage)
    if q["scheme"] == "per_tensor":
        qt = torch._make_per_tensor_quantized_tensor(ints, q["scale"], q["zero_point"])
    else:
        qt = torch._make_per_channel_quantized_tensor(
            ints, torch.tensor(q["scales"], dtype=torch.float64), torch.tensor(q["zero_points"], dtype=torch.int64), q["axis"]
        )
    return qt.dequantize()


def _restore_qparams(model: nn.Module, float_state: dict[str, torch.Tensor], qparams: list[dict[str, Any]]) -> None:
    mods = dict(model.named_modules())
    own = callable(getattr(model, "set_quantized_weights", None))
    weights = {}
    for q in qparams:
        prefix = f"{q['module']}." if q["module"] else ""
        w = float_state[f"{prefix}weight"]
        dtype = getattr(torch, q["dtype"])
        if q["scheme"] == "per_tensor":
            qw = torch.quantize_per_tensor(w, q["scale"], q["zero_point"], dtype)
        else:
            qw = torch.quantize_per_channel(
                w, torch.tensor(q["scales"], dtype=torch.float64), torch.tensor(q["zero_points"]), q["axis"], dtype
            )
        if own:
            weights[f"{prefix}weight"] = qw
            continue
        mod = mods.get(q["module"])
        if mod is None or not hasattr(mod, "set_weight_bias"):
            raise ValueError(f"quantized module {q['module']!r} missing from the rebuilt model")
        mod.set_weight_bias(qw, float_state.get(f"{prefix}bias"))
    if own:
        model.set_quantized_weights(weights)


# -- the model file -----------------------------------------------------------------


def pack_model(model: nn.Module, header: ModelHeader, path: str | os.PathLike[str], *, entropy: bool = True) -> PackReport:
    """Write ``model`` (as loaded by ``artifacts.load_model``) to a packed file.

    Args:
        entropy: Huffman-code the index and position streams where that is smaller;
            False writes them at fixed width (Deep Compression without its last step).

    Returns:
        A ``PackReport`` whose ``breakdown`` splits the file size into weight
        indices, codebooks, positions, raw values and overhead (fixed header,
        metadata, checksum); the parts add up to the file size.
    """
    import warnings

    float_model = to_float(model, header)
    state = float_model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; reading them still works
        qparams, ints = _qparams(model)
        grid = {q["module"]: i for i, q in enumerate(qparams)}
    p = _Payload()
    tensors, spent = [], []
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            start = len(p.buf)
            i = grid.get(k.removesuffix("weight").removesuffix("."))
            if k in ints and i is not None and torch.equal(_dequantize(ints[k], qparams[i]), v):
                entry = _encode_tensor(p, k, ints[k].to(torch.float32), entropy)
                entry.update(dtype=str(v.dtype).removeprefix("torch."), int_grid=i)
            else:
                entry = _encode_tensor(p, k, v, entropy)
            tensors.append(entry)
            spent.append(len(p.buf) - start)
    meta = {
        "header": header.model_dump(mode="json"),
        "tensors": tensors,
        "qparams": qparams,
    }
    data, meta_len = container.encode(meta, bytes(p.buf))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    breakdown = dict(p.spent)
    breakdown["overhead"] = container.FIXED_OVERHEAD + meta_len
    assert sum(breakdown.values()) == len(data)
    summary = [
        {
            "name": t["name"],
            "shape": t["shape"],
            "layout": t.get("layout"),
            "nnz": t.get("nnz"),
            "values": t["values"]["kind"] + (f"[{t['values']['k']}]" if t["values"]["kind"] == "codebook" else ""),
            "bytes": nbytes,
        }
        for t, nbytes in zip(tensors, spent, strict=True)
    ]
    return PackReport(path=str(path), size_bytes=len(data), breakdown=breakdown, tensors=summary)


def read_packed(path: str | os.PathLike[str]) -> tuple[ModelHeader, dict[str, Any], memoryview]:
    """Check a packed file (magic, version, lengths, CRC) and parse its metadata: (header, metadata, payload).

    No tensor is decoded here: ``decode_state`` does that, once the announced shapes were checked.
    """
    path = Path(path)
    if not path.is_file():
        raise PackedFormatError(f"model file not found: {path}")
    meta, payload = container.decode(path.read_bytes(), str(path))
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), list):
        raise PackedFormatError(f"{path} is corrupt or inconsistent: no tensor list in its metadata")
    return ModelHeader.parse(meta.get("header"), str(path)), meta, payload


def decode_state(meta: dict[str, Any], payload: memoryview, where: str,
                 expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The float state dict a packed file stores.

    Args:
        expected: the shape of every tensor the architecture has: a tensor the file
            announces with another name or shape is refused before it is decoded.
    """
    state = {}
    try:
        for t in meta["tensors"]:
            name = t["name"]
            if expected is not None:
                if name not in expected:
                    raise ValueError(f"tensor {name!r} is not part of the architecture in the header")
                if tuple(int(d) for d in t["shape"]) != tuple(expected[name]):
                    raise ValueError(f"tensor {name!r} is shaped {t['shape']}, the architecture needs {list(expected[name])}")
            if "int_grid" in t:  # integers of a torch.ao quantized weight: dequantize as torch does
                ints = _decode_tensor(payload, {**t, "dtype": "float32"})
                state[name] = _dequantize(ints, meta["qparams"][t["int_grid"]]).to(_dtype(t["dtype"]))
            else:
                state[name] = _decode_tensor(payload, t)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise PackedFormatError(f"{where} is corrupt or inconsistent: {exc}") from None
    return state


def load_packed(path: str | os.PathLike[str], allow: Sequence[str] = ()) -> tuple[nn.Module, ModelHeader]:
    """Rebuild a packed model for inference (eval mode, CPU): (model, header).

    Args:
        allow: modules trusted to be imported when the header names a user class.
    """
    import warnings

    header, meta, payload = read_packed(path)
    upto = float_index(header)
    skeleton = header.build(upto=upto, allow=allow)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if isinstance(v, torch.Tensor)}
    state = decode_state(meta, payload, str(path), expected)
    model = build_and_load(header, state, str(path), allow, upto=upto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation warnings while re-quantizing
        try:
            model = from_float(model, header)
            if meta.get("qparams"):
                _restore_qparams(model, state, meta["qparams"])
        except InputError:
            raise
        except Exception as exc:
            raise PackedFormatError(f"{path} is corrupt or inconsistent: {type(exc).__name__}: {exc}") from None
    return model.eval(), header
