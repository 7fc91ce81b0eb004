"""Deep Compression's storage (Han et al. 2016) for any shrinkflow model, with every byte accounted for.

For every tensor of the model's float state dict (``artifacts.to_float``: the same
function, float weights, structurally pruned layers already at their smaller
shapes) the packer finds the structure itself and keeps the smallest of:

* **dense**: every value stored;
* **sparse**: only non-zeros, their positions written as relative indices (the gap
  since the previous non-zero) of width ``b`` (1..12, the smallest stream wins); a
  gap too long for ``b`` bits is bridged by an escape symbol ``2^b - 1`` that skips
  ``2^b - 1`` positions (Han et al. store a filler zero there; the escape skips the
  filler's weight index too).

and for the stored values, the smallest of:

* **codebook**: at most 256 distinct values (weight sharing: kmeans clusters) as a
  table plus one index per value; int8 weights of torch.ao quantized layers are
  stored as their integers the same way (plus their scales), even per-channel;
* **raw**: the narrowest type that holds the values exactly (int8 / float16 / the
  tensor's own type; integers as int8/int16/int32).

Index and position streams are Huffman-coded when that beats fixed width.

Every choice above is lossless. One optional step is not: given ``reference``
inputs (classification), float tensors (biases, codebooks, unshared weights) are
rounded to float16 where the model's predicted class on every reference input stays
the same (tried all at once, else tensor by tensor, largest saving first); the
report lists the rounded tensors. torch.ao int8 layers (dynamic, static, QAT) are
re-quantized on load with their stored scales, so their integer weights are the
same too.

File format version 2 (``container``) stores the tensor table in binary (varints,
names and shapes implied by the architecture in the header, sections back to back)
and hoists long number lists out of the JSON header (the removed-unit indices of a
``structured`` transform, per-channel scales) into coded payload sections. Version
1 files still load.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
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
from shrinkflow.packing.container import PackedFormatError, Reader, Writer
from shrinkflow.quantization._compat import quiet_torch_ao

#: Most distinct values a codebook may hold (8-bit indices before entropy coding).
MAX_CODEBOOK = 256
#: Largest tensor a packed file may announce (the architecture check comes first; this bounds the rest).
MAX_TENSOR = 2**28
#: Relative-index widths tried for sparse positions (version 1 wrote 2, 3, 4, 5, 6 or 8).
INDEX_WIDTHS = tuple(range(1, 13))
#: Where a file's bytes go (``PackReport.breakdown``): the sections of weight tensors
#: (positions of non-zeros, shared-weight indices, codebooks, raw weight values), bias
#: tensors, other state (e.g. BatchNorm statistics), int8 scales, the removed-unit
#: lists of structurally pruned layers, the tensor table, the compressed JSON header,
#: and the container (magic, lengths, checksum).
CATEGORIES = (
    "positions", "indices", "codebooks", "weights", "biases", "other", "scales", "structure", "table", "header", "container",
)
#: Shortest number list moved out of the JSON header into a coded payload section.
HOIST_MIN = 4


@dataclass
class PackReport:
    """What was written: total size, its breakdown, and how each tensor was stored.

    rounded: tensors stored as float16 because every reference prediction stayed the
        same (empty when packed losslessly); checked: how many reference inputs.
    """

    path: str
    size_bytes: int
    breakdown: dict[str, int]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    rounded: list[str] = field(default_factory=list)
    checked: int = 0
    version: int = container.VERSION

    def markdown(self) -> list[str]:
        """The breakdown and the tensors as markdown tables (what ``shrinkflow pack`` prints)."""
        return render(self.size_bytes, self.breakdown, self.tensors)


def render(size: int, breakdown: dict[str, int], tensors: list[dict[str, Any]]) -> list[str]:
    """Markdown: bytes per section (non-empty ones, with their share of the file), then per tensor."""
    lines = ["| section | bytes | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {100 * v / size:.1f} % |" for k, v in breakdown.items() if v]
    lines += [f"| **total** | **{size:,}** | 100 % |", ""]
    lines += ["| tensor | shape | layout | non-zeros | values | precision | positions B | total B |", "|---|---|---|---:|---|---|---:|---:|"]
    for t in tensors:
        shape = "×".join(map(str, t["shape"])) or "scalar"
        nnz = "" if t.get("nnz") is None else f"{t['nnz']:,}"
        lines.append(
            f"| {t['name']} | {shape} | {t.get('layout')} | {nnz} | {t['values']} | {t.get('precision', 'exact')} | "
            f"{t.get('positions_bytes', 0):,} | {t['bytes']:,} |"
        )
    return lines


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
    if int(desc["n"]) > 8 * len(data):  # every symbol takes at least one bit
        raise ValueError(f"a stream announces {desc['n']} symbols in {len(data)} bytes")
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


def _positions(p: _Payload, pos: np.ndarray, entropy: bool, category: str) -> dict[str, Any]:
    """Write sorted positions as relative indices of the width whose stream is smallest."""
    best: tuple[int, dict[str, Any], bytes] | None = None
    for w in INDEX_WIDTHS:
        desc, data = _stream_candidates(relative_indices(pos, w), 1 << w, entropy)
        if best is None or len(data) < len(best[2]):
            best = (w, desc, data)
    width, desc, data = best  # type: ignore[misc]
    return {**desc, **p.add(data, category), "width": width}


def _read_positions(payload: memoryview, desc: dict[str, Any], n: int, widths: Sequence[int]) -> np.ndarray:
    """Sorted positions below ``n`` from a relative-index stream."""
    if int(desc["width"]) not in widths:
        raise ValueError(f"invalid relative-index width {desc['width']}")
    pos = positions_from_relative(_read_stream(payload, desc, 2 * n + 1), int(desc["width"]))
    if len(pos) and (pos[-1] >= n or pos.min() < 0):
        raise ValueError("non-zero positions fall outside the tensor")
    return pos


# -- values ------------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_raw(data: bytes, dtype: torch.dtype, n: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)[:n].clone()


_FLOATS = (torch.float32, torch.float16, torch.float64, torch.bfloat16)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _narrowest(values: torch.Tensor) -> torch.Tensor:
    """``values`` in the narrowest type that holds them exactly: int8, float16 (floats), int16/int32 (integers)."""
    if values.dtype == torch.bool or not values.numel():
        return values
    if values.dtype in _INTS:
        lo, hi = int(values.min()), int(values.max())
        for t in (torch.int8, torch.int16, torch.int32):
            info = torch.iinfo(t)
            if info.min <= lo and hi <= info.max:
                return values.to(t)
        return values
    if bool((values == values.round()).all()) and values.min() >= -128 and values.max() <= 127:
        return values.to(torch.int8)
    if values.dtype != torch.float16 and bool(torch.equal(values.half().to(values.dtype), values)):
        return values.half()
    return values


def _categories(role: str) -> tuple[str, str, str]:
    """(codebook, index, raw) categories of a tensor's value sections."""
    return ("codebooks", "indices", "weights") if role == "weight" else (role, role, role)


def _write_values(p: _Payload, values: torch.Tensor, entropy: bool, role: str) -> dict[str, Any]:
    """Store a 1-D tensor as codebook + indices or raw, whichever is smaller."""
    book_cat, index_cat, raw_cat = _categories(role)
    raw = _narrowest(values)
    raw_size = raw.numel() * raw.element_size()
    if values.dtype != torch.bool:
        uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
        if 0 < len(uniq) <= MAX_CODEBOOK:
            book = _narrowest(uniq)
            idx_desc, idx_data = _stream_candidates(inverse.numpy().astype(np.int64), len(uniq), entropy)
            if book.numel() * book.element_size() + len(idx_data) < raw_size:
                book_ref = p.add(_raw_bytes(book), book_cat)
                return {
                    "kind": "codebook",
                    "dtype": str(book.dtype).removeprefix("torch."),
                    "k": len(uniq),
                    **book_ref,
                    "index": {**idx_desc, **p.add(idx_data, index_cat)},
                }
    return {"kind": "raw", "dtype": str(raw.dtype).removeprefix("torch."), **p.add(_raw_bytes(raw), raw_cat)}


#: The dtypes a packed file may name (looked up here, never resolved by name on torch);
#: a version-2 table refers to them by their position in this tuple.
_FILE_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool,
)
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _FILE_DTYPES}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name]
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


def _role(name: str, t: torch.Tensor) -> str:
    """Which category a state tensor's bytes count under."""
    if name.endswith("weight") and t.dim() >= 2:
        return "weight"
    return "biases" if name.endswith("bias") else "other"


def _encode_tensor(p: _Payload, name: str, t: torch.Tensor, entropy: bool = True, role: str | None = None) -> dict[str, Any]:
    t = t.detach().cpu()
    role = role or _role(name, t)
    entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "role": role}
    flat = t.reshape(-1)
    if t.dtype not in _FLOATS:  # integer and bool state (e.g. BatchNorm's num_batches_tracked): dense
        entry["layout"] = "dense"
        entry["values"] = _write_values(p, flat, entropy, role)
        return entry
    if t.dtype == torch.bfloat16:  # torch.unique has no bf16 kernel on CPU
        flat = flat.float()
    nnz = int(torch.count_nonzero(flat))
    # Write each layout into a payload of its own; append the smaller one.
    dense = _Payload(len(p.buf))
    layouts = {"dense": (dense, {"values": _write_values(dense, flat, entropy, role)})}
    if nnz < flat.numel():
        sparse = _Payload(len(p.buf))
        pos = torch.nonzero(flat, as_tuple=True)[0].numpy()
        layouts["sparse"] = (sparse, {
            "positions": _positions(sparse, pos, entropy, "positions" if role == "weight" else role),
            "values": _write_values(sparse, flat[torch.from_numpy(pos)], entropy, role),
        })
    layout = min(layouts, key=lambda k: len(layouts[k][0].buf))
    chosen, desc = layouts[layout]
    p.append(chosen)
    return {**entry, "layout": layout, "nnz": nnz, **desc}


def _decode_tensor(payload: memoryview, entry: dict[str, Any], widths: Sequence[int] = INDEX_WIDTHS) -> torch.Tensor:
    shape = [int(d) for d in entry["shape"]]
    n = math.prod(shape)
    if n < 0 or n > MAX_TENSOR:
        raise ValueError(f"tensor {entry.get('name')!r} announces {n} values")
    dtype = _dtype(entry["dtype"])
    if entry["layout"] == "dense":
        return _read_values(payload, entry["values"], n).to(dtype).reshape(shape)
    pos = _read_positions(payload, entry["positions"], n, widths)
    out = torch.zeros(n, dtype=dtype)
    out[torch.from_numpy(pos)] = _read_values(payload, entry["values"], len(pos)).to(dtype)
    return out.reshape(shape)


# -- quantized modules ---------------------------------------------------------------


def _qparams(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Scales of torch.ao quantized weights, and their integers by float weight key.

    The integers are stored instead of the dequantized floats (≤ 256 distinct values
    per tensor even with per-channel scales); the scales let loading rebuild the
    same floats and re-quantize to the same integers.
    """
    out, ints = [], {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not callable(w) or not hasattr(mod, "set_weight_bias"):
            continue
        qw = w()
        if not (isinstance(qw, torch.Tensor) and qw.is_quantized):
            continue
        entry: dict[str, Any] = {"module": name, "dtype": str(qw.dtype).removeprefix("torch.")}
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
        ints[f"{name}.weight" if name else "weight"] = qw.int_repr()
        out.append(entry)
    return out, ints


_QDTYPES = {"qint8": torch.qint8, "quint8": torch.quint8}


def _qdtype(name: str) -> torch.dtype:
    try:
        return _QDTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantized dtype {name!r}") from None


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
    for q in qparams:
        mod = mods.get(q["module"])
        if mod is None or not hasattr(mod, "set_weight_bias"):
            raise ValueError(f"quantized module {q['module']!r} missing from the rebuilt model")
        prefix = f"{q['module']}." if q["module"] else ""
        w = float_state[f"{prefix}weight"]
        b = float_state.get(f"{prefix}bias")
        dtype = _qdtype(q["dtype"])
        if q["scheme"] == "per_tensor":
            qw = torch.quantize_per_tensor(w, q["scale"], q["zero_point"], dtype)
        else:
            qw = torch.quantize_per_channel(
                w, torch.tensor(q["scales"], dtype=torch.float64), torch.tensor(q["zero_points"]), q["axis"], dtype
            )
        mod.set_weight_bias(qw, b)


def _assemble(header: ModelHeader, state: dict[str, torch.Tensor], qparams: list[dict[str, Any]], where: str,
              allow: Sequence[str] = (), skeleton: nn.Module | None = None) -> nn.Module:
    """The inference model a packed file describes: the float architecture holding ``state``, with the
    float-incompatible transforms (quantization) made again and int8 scales restored.

    ``skeleton``: the float architecture already built (copied, not changed), to skip rebuilding it.
    """
    if skeleton is None:
        model = build_and_load(header, state, where, allow, upto=float_index(header))
    else:
        model = copy.deepcopy(skeleton)
        model.load_state_dict(state)
        model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation warnings while re-quantizing
        try:
            model = from_float(model, header)
            if qparams:
                _restore_qparams(model, state, qparams)
        except InputError:
            raise
        except Exception as exc:
            raise PackedFormatError(f"{where} is corrupt or inconsistent: {type(exc).__name__}: {exc}") from None
    return model.eval()


# -- float16 where the predictions stay the same --------------------------------------


def _roundable(state: dict[str, torch.Tensor], integer: set[str]) -> dict[str, int]:
    """{tensor: bytes float16 would save (estimated)} for float tensors that float16 does not hold exactly.

    A tensor with a non-zero value that float16 flushes to zero is left alone (rounding must not prune).
    """
    out = {}
    for k, v in state.items():
        if k in integer or v.dtype not in (torch.float32, torch.float64) or not v.numel():
            continue
        half = v.half()
        if not bool(torch.isfinite(half).all()) or bool(((half == 0) & (v != 0)).any()):
            continue
        if torch.equal(half.to(v.dtype), v):
            continue
        nz = v[v != 0]
        distinct = len(torch.unique(nz)) if nz.numel() else 0
        stored = distinct if distinct <= MAX_CODEBOOK else nz.numel()  # a codebook's entries or every value
        out[k] = stored * (v.element_size() - 2)
    return out


def _choose_rounding(
    model: nn.Module, header: ModelHeader, state: dict[str, torch.Tensor], qparams: list[dict[str, Any]],
    integer: set[str], reference: torch.Tensor,
) -> list[str]:
    """The float tensors to store as float16: all of them if every predicted class on ``reference`` stays
    the same, else those that keep them, added greedily by saving."""
    candidates = _roundable(state, integer)
    if not candidates:
        return []
    from shrinkflow.training import predict

    target = predict(model, reference).argmax(1)
    skeleton = build_and_load(header, state, "the packed model", header.imports, upto=float_index(header))

    def keeps(names: list[str]) -> bool:
        trial = {k: (v.half().to(v.dtype) if k in names else v) for k, v in state.items()}
        m = _assemble(header, trial, qparams, "the packed model", header.imports, skeleton)
        return bool(torch.equal(predict(m, reference).argmax(1), target))

    order = sorted(candidates, key=lambda k: -candidates[k])
    if keeps(order):
        return order
    chosen: list[str] = []
    for k in order:
        if keeps([*chosen, k]):
            chosen.append(k)
    return chosen


# -- number lists hoisted out of the JSON header --------------------------------------


def _hoistable(v: Any) -> str | None:
    """``set`` (sorted distinct ints ≥ 0), ``ints``, ``floats``, or None for a value left in the JSON."""
    if not isinstance(v, list) or len(v) < HOIST_MIN:
        return None
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if v[0] >= 0 and all(b > a for a, b in zip(v, v[1:], strict=False)) and v[-1] < MAX_TENSOR:
            return "set"
        return "ints" if all(-(2**62) < x < 2**62 for x in v) else None
    if all(isinstance(x, float) for x in v) and all(math.isfinite(x) for x in v):
        return "floats"
    return None


def _hoist(obj: Any, path: list[Any], found: list[tuple[list[Any], str, list[Any]]]) -> Any:
    """A copy of ``obj`` with every hoistable list replaced by None; ``found`` gets (path, kind, list)."""
    kind = _hoistable(obj)
    if kind is not None:
        found.append((path, kind, obj))
        return None
    if isinstance(obj, dict):
        return {k: _hoist(v, [*path, k], found) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hoist(v, [*path, i], found) for i, v in enumerate(obj)]
    return obj


def _put_back(meta: dict[str, Any], paths: list[Any], values: list[list[Any]]) -> None:
    if not isinstance(paths, list) or len(paths) != len(values):
        raise ValueError("the hoisted lists do not match their paths")
    for path, value in zip(paths, values, strict=True):
        if not isinstance(path, list) or not path:
            raise ValueError(f"invalid hoisted-list path {path!r}")
        node: Any = meta
        for step in path[:-1]:
            node = node[step]
        if not isinstance(node, dict | list) or node[path[-1]] is not None:
            raise ValueError(f"hoisted-list path {path!r} does not point at a placeholder")
        node[path[-1]] = value


# -- the version-2 table --------------------------------------------------------------

_TENSOR, _SET, _ARRAY = 0, 1, 2
_SPARSE, _CODEBOOK, _INT_GRID = 1, 2, 4
_DTYPE_CODE = {d: i for i, d in enumerate(_FILE_DTYPES)}


def _code(name: str) -> int:
    return _DTYPE_CODE[_dtype(name)]


def _put_stream(w: Writer, desc: dict[str, Any]) -> None:
    w.u8(0 if desc["coding"] == "fixed" else 1)
    w.uint(int(desc["n"]))
    w.uint(int(desc["width"] if desc["coding"] == "fixed" else desc["symbols"]))
    w.uint(int(desc["len"]))


def _get_stream(r: Reader, cursor: list[int]) -> dict[str, Any]:
    coding = r.u8()
    if coding > 1:
        raise ValueError(f"unknown stream coding {coding}")
    desc: dict[str, Any] = {"coding": "fixed" if coding == 0 else "huffman", "n": r.uint()}
    desc["width" if coding == 0 else "symbols"] = r.uint()
    desc["len"] = r.uint()
    desc["off"] = cursor[0]
    cursor[0] += desc["len"]
    return desc


def _put_values(w: Writer, entry: dict[str, Any]) -> None:
    """Flags, stored dtype and the streams of a tensor entry (``_encode_tensor``'s dict)."""
    v = entry["values"]
    sparse = entry["layout"] == "sparse"
    flags = (_SPARSE if sparse else 0) | (_CODEBOOK if v["kind"] == "codebook" else 0) | (_INT_GRID if "int_grid" in entry else 0)
    w.u8(flags)
    w.u8(_code(v["dtype"]))
    if "int_grid" in entry:
        w.uint(int(entry["int_grid"]))
    if sparse:
        w.uint(int(entry["nnz"]))
        w.u8(int(entry["positions"]["width"]))
        _put_stream(w, entry["positions"])
    if v["kind"] == "codebook":
        w.uint(int(v["k"]))
        _put_stream(w, v["index"])
    else:
        w.uint(int(v["len"]))


def _get_values(r: Reader, cursor: list[int]) -> dict[str, Any]:
    flags = r.u8()
    if flags & ~(_SPARSE | _CODEBOOK | _INT_GRID):
        raise ValueError(f"unknown tensor flags {flags:#x}")
    code = r.u8()
    if code >= len(_FILE_DTYPES):
        raise ValueError(f"unknown dtype code {code}")
    dtype = str(_FILE_DTYPES[code]).removeprefix("torch.")
    entry: dict[str, Any] = {"layout": "sparse" if flags & _SPARSE else "dense"}
    if flags & _INT_GRID:
        entry["int_grid"] = r.uint()
    if flags & _SPARSE:
        entry["nnz"] = r.uint()
        width = r.u8()
        entry["positions"] = {**_get_stream(r, cursor), "width": width}
    if flags & _CODEBOOK:
        k = r.uint()
        if not 0 < k <= MAX_CODEBOOK:
            raise ValueError(f"invalid codebook size {k}")
        size = k * torch.empty(0, dtype=_FILE_DTYPES[code]).element_size()
        book = {"kind": "codebook", "dtype": dtype, "k": k, "off": cursor[0], "len": size}
        cursor[0] += size
        book["index"] = _get_stream(r, cursor)
        entry["values"] = book
    else:
        n = r.uint()
        entry["values"] = {"kind": "raw", "dtype": dtype, "off": cursor[0], "len": n}
        cursor[0] += n
    return entry


def _write_table(entries: list[dict[str, Any]]) -> bytes:
    w = Writer()
    w.uint(len(entries))
    for e in entries:
        if e["tag"] == "set":
            w.u8(_SET)
            w.uint(int(e["count"]))
            w.u8(int(e["positions"]["width"]))
            _put_stream(w, e["positions"])
        elif e["tag"] == "array":
            w.u8(_ARRAY)
            w.u8(_code(e["dtype"]))
            w.uint(int(e["shape"][0]))
            _put_values(w, e)
        else:
            w.u8(_TENSOR)
            _put_values(w, e)
    return bytes(w.buf)


def _parse_table(payload: memoryview) -> tuple[list[dict[str, Any]], int]:
    """The table's entries with section offsets (sections follow the table back to back), and the payload's used length."""
    r = Reader(payload)
    count = r.uint()
    if count > 1 << 20:
        raise ValueError(f"the tensor table announces {count} entries")
    pending: list[tuple[int, Any]] = []
    # Offsets are relative to the end of the table, which is known only once it is read.
    cursor = [0]
    for _ in range(count):
        tag = r.u8()
        if tag == _SET:
            n = r.uint()
            width = r.u8()
            pending.append((tag, {"tag": "set", "count": n, "positions": {**_get_stream(r, cursor), "width": width}}))
        elif tag == _ARRAY:
            code = r.u8()
            if code >= len(_FILE_DTYPES):
                raise ValueError(f"unknown dtype code {code}")
            length = r.uint()
            e = _get_values(r, cursor)
            pending.append((tag, {"tag": "array", "dtype": str(_FILE_DTYPES[code]).removeprefix("torch."), "shape": [length], **e}))
        elif tag == _TENSOR:
            pending.append((tag, {"tag": "tensor", **_get_values(r, cursor)}))
        else:
            raise ValueError(f"unknown table entry tag {tag}")
    base = r.pos
    entries = [_shift(e, base) for _, e in pending]
    return entries, base + cursor[0]


def _shift(obj: Any, base: int) -> Any:
    """Add ``base`` to every section offset of a parsed entry."""
    if isinstance(obj, dict):
        return {k: (v + base if k == "off" else _shift(v, base)) for k, v in obj.items()}
    return obj


# -- the model file -----------------------------------------------------------------


def pack_model(
    model: nn.Module, header: ModelHeader, path: str | os.PathLike[str], *, entropy: bool = True,
    reference: torch.Tensor | None = None,
) -> PackReport:
    """Write ``model`` (as loaded by ``artifacts.load_model``) to a packed file.

    Args:
        entropy: Huffman-code the index and position streams where that is smaller;
            False writes them at fixed width (Deep Compression without its last step).
        reference: inputs (``[N, *input_shape]``) whose predicted classes the file must
            keep: float tensors (biases, codebooks, unshared weights) are then stored
            as float16 wherever every one of these predictions stays the same. None
            (or a regression model) packs losslessly: the loaded model computes
            exactly what ``model`` does.

    Returns:
        A ``PackReport`` whose ``breakdown`` splits the file size into ``CATEGORIES``;
        the parts add up to the file size.
    """
    float_model = to_float(model, header)
    state = {k: v.detach().cpu() for k, v in float_model.state_dict().items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; reading them still works
        qparams, ints = _qparams(model)
        grid = {q["module"]: i for i, q in enumerate(qparams)}
    integer = {
        k for k in ints
        if (i := grid.get(k.removesuffix("weight").removesuffix("."))) is not None and torch.equal(_dequantize(ints[k], qparams[i]), state[k])
    }
    rounded: list[str] = []
    checked = 0
    if reference is not None and header.task == "classification" and len(reference):
        rounded = _choose_rounding(model, header, state, qparams, integer, reference)
        checked = len(reference)
        for k in rounded:
            state[k] = state[k].half().to(state[k].dtype)

    # Number lists of the header (removed units, per-channel scales) become coded sections.
    found: list[tuple[list[Any], str, list[Any]]] = []
    meta = _hoist({"h": header.model_dump(mode="json"), "q": qparams}, [], found)
    meta["l"] = [path_ for path_, _, _ in found]

    p = _Payload()
    entries: list[dict[str, Any]] = []
    for path_, kind, values in found:
        category = "scales" if path_[0] == "q" else "structure"
        if kind == "set":
            pos = np.asarray(values, dtype=np.int64)
            entries.append({"tag": "set", "count": len(values), "positions": _positions(p, pos, entropy, category)})
        else:
            t = torch.tensor(values, dtype=torch.float64 if kind == "floats" else torch.int64)
            entries.append({"tag": "array", **_encode_tensor(p, ".".join(map(str, path_)), t, entropy, role=category)})
    summary_from = len(entries)
    spent = []
    for k, v in state.items():
        start = len(p.buf)
        if k in integer:
            i = grid[k.removesuffix("weight").removesuffix(".")]
            entry = _encode_tensor(p, k, ints[k].to(torch.float32), entropy)
            entry.update(dtype=str(v.dtype).removeprefix("torch."), int_grid=i)
        else:
            entry = _encode_tensor(p, k, v, entropy)
        entries.append({"tag": "tensor", **entry})
        spent.append(len(p.buf) - start)

    table = _write_table(entries)
    data, meta_len = container.encode(meta, table + bytes(p.buf))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    breakdown = dict(p.spent)
    breakdown["table"] = len(table)
    breakdown["header"] = meta_len
    breakdown["container"] = container.FIXED_OVERHEAD
    assert sum(breakdown.values()) == len(data)
    summary = [_row(t, nbytes, t["name"] in rounded) for t, nbytes in zip(entries[summary_from:], spent, strict=True)]
    return PackReport(
        path=str(path), size_bytes=len(data), breakdown=breakdown, tensors=summary, rounded=rounded, checked=checked,
    )


def _row(t: dict[str, Any], nbytes: int, rounded: bool) -> dict[str, Any]:
    """One tensor of the report: how it is stored and what it costs."""
    v = t["values"]
    values = f"{v['kind']}[{v['k']}] {v['dtype']}" if v["kind"] == "codebook" else f"raw {v['dtype']}"
    if "int_grid" in t:
        values += " (int8 grid)"
    return {
        "name": t["name"], "shape": t["shape"], "layout": t.get("layout"), "nnz": t.get("nnz"), "values": values,
        "codebook": int(v["k"]) if v["kind"] == "codebook" else None,
        "precision": "float16 (rounded)" if rounded else "exact",
        "positions_bytes": int(t["positions"]["len"]) if "positions" in t else 0,
        "bytes": nbytes,
    }


def read_packed(path: str | os.PathLike[str]) -> tuple[ModelHeader, dict[str, Any], memoryview]:
    """Check a packed file (magic, version, lengths, CRC) and parse its metadata: (header, metadata, payload).

    The metadata has the same shape for every format version: ``version``,
    ``tensors`` (one entry per state tensor, in state-dict order, with its sections'
    offsets; version 2 entries carry no name or shape, the architecture gives them)
    and ``qparams``. No tensor is decoded here: ``decode_state`` does that, once the
    announced shapes were checked.
    """
    path = Path(path)
    if not path.is_file():
        raise PackedFormatError(f"model file not found: {path}")
    version, meta, payload = container.decode(path.read_bytes(), str(path))
    where = str(path)
    if version == 1:
        if not isinstance(meta.get("tensors"), list):
            raise PackedFormatError(f"{where} is corrupt or inconsistent: no tensor list in its metadata")
        meta = {"version": 1, "tensors": meta["tensors"], "qparams": meta.get("qparams") or [], "header": meta.get("header")}
    else:
        try:
            entries, used = _parse_table(payload)
            if used > len(payload):
                raise ValueError(f"the table's sections need {used} bytes, the payload holds {len(payload)}")
            paths = meta.get("l", [])
            hoisted = entries[: len(paths)] if isinstance(paths, list) else []
            values = [_hoisted_value(payload, e) for e in hoisted]
            _put_back(meta, paths, values)
            meta = {"version": version, "tensors": entries[len(hoisted) :], "qparams": meta.get("q") or [], "header": meta.get("h")}
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise PackedFormatError(f"{where} is corrupt or inconsistent: {exc}") from None
    return ModelHeader.parse(meta.get("header"), where), meta, payload


def _hoisted_value(payload: memoryview, e: dict[str, Any]) -> list[Any]:
    if e["tag"] == "set":
        n = int(e["count"])
        if n > MAX_TENSOR:
            raise ValueError(f"a hoisted list announces {n} values")
        pos = positions_from_relative(_read_stream(payload, e["positions"], 2 * MAX_TENSOR), int(e["positions"]["width"]))
        if len(pos) != n:
            raise ValueError("a hoisted index list does not hold the values it announces")
        return [int(x) for x in pos]
    if e["tag"] != "array":
        raise ValueError("a state tensor stands where a hoisted list belongs")
    t = _decode_tensor(payload, {**e, "name": "hoisted list"})
    return [float(x) for x in t.tolist()] if t.dtype.is_floating_point else [int(x) for x in t.tolist()]


def decode_state(meta: dict[str, Any], payload: memoryview, where: str,
                 expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> dict[str, torch.Tensor]:
    """The float state dict a packed file stores.

    Args:
        expected: the shape and dtype of every tensor the architecture has, in state-dict
            order: a version-1 tensor announced with another name or shape is refused
            before it is decoded; version-2 tensors (no names) take them in order.
    """
    state = {}
    widths = (2, 3, 4, 5, 6, 8) if meta.get("version", 1) == 1 else INDEX_WIDTHS
    try:
        tensors = meta["tensors"]
        if "name" not in (tensors[0] if tensors else {"name": None}):
            if expected is None:
                raise ValueError("a version-2 tensor table needs the architecture's tensors")
            if len(tensors) != len(expected):
                raise ValueError(f"the file stores {len(tensors)} tensors, the architecture in its header has {len(expected)}")
            tensors = [
                {**t, "name": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                for t, (name, (shape, dtype)) in zip(tensors, expected.items(), strict=True)
            ]
        for t in tensors:
            name = t["name"]
            if expected is not None:
                if name not in expected:
                    raise ValueError(f"tensor {name!r} is not part of the architecture in the header")
                if tuple(int(d) for d in t["shape"]) != tuple(expected[name][0]):
                    raise ValueError(f"tensor {name!r} is shaped {t['shape']}, the architecture needs {list(expected[name][0])}")
            if "int_grid" in t:  # integers of a torch.ao quantized weight: dequantize as torch does
                ints = _decode_tensor(payload, {**t, "dtype": "float32"}, widths)
                with quiet_torch_ao():  # torch deprecates creating quantized tensors; reading them is what we do
                    state[name] = _dequantize(ints, meta["qparams"][t["int_grid"]]).to(_dtype(t["dtype"]))
            else:
                state[name] = _decode_tensor(payload, t, widths)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise PackedFormatError(f"{where} is corrupt or inconsistent: {exc}") from None
    return state


def load_packed(path: str | os.PathLike[str], allow: Sequence[str] = ()) -> tuple[nn.Module, ModelHeader]:
    """Rebuild a packed model for inference (eval mode, CPU): (model, header).

    Args:
        allow: modules trusted to be imported when the header names a user class.
    """
    header, meta, payload = read_packed(path)
    skeleton = header.build(upto=float_index(header), allow=allow)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items() if isinstance(v, torch.Tensor)}
    state = decode_state(meta, payload, str(path), expected)
    model = _assemble(header, state, meta["qparams"], str(path), allow)
    return model, header
