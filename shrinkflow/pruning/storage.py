"""The ``sparse`` storage: pruned tensors on disk as a bitmask plus their nonzero values.

A "90 % sparse" model saved densely is exactly as large as the dense one. This
encoding stores each tensor that has enough zeros as ``np.packbits`` of its nonzero
mask (1 bit per element) and the nonzero values in their own dtype, so the file
shrinks with sparsity (float32 at 90 % zeros: 0.125 + 0.4 bytes per weight instead
of 4). Decoding rebuilds the exact tensors, so outputs after reload are identical.

It also handles torch quantized tensors (``qint8``/``quint8``, per-tensor or
per-channel affine, e.g. the weights inside dynamic-int8 Linear packed params):
their integer representation is stored sparse around the zero point, with scale(s)
and zero point(s) kept, so a pruned-then-quantized model stays small too. Other
values (dtypes, tensor subclasses, scalars) are stored as they are.

No library stores a state dict like this and loads with ``weights_only=True``
(torch.sparse tensors store 64-bit indices: larger than dense below ~50 % zeros
for float32), hence our own, small, encoding.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from shrinkflow.artifacts import Storage, register_storage

NAME = "sparse"
#: Below this many elements a tensor is stored dense: the bookkeeping outweighs the gain.
MIN_NUMEL = 256
#: Bytes of file overhead an extra tensor record costs (zip entry + pickle), roughly.
_RECORD_OVERHEAD = 200


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def _unpack(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))


def _worth_it(numel: int, nnz: int, itemsize: int) -> bool:
    sparse = math.ceil(numel / 8) + nnz * itemsize + _RECORD_OVERHEAD
    return numel >= MIN_NUMEL and sparse < numel * itemsize


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    # Exact type check: tensor subclasses (Parameters aside) keep their own serialization.
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_sparse or t.device.type != "cpu":
        return {"t": "raw", "v": t}
    t = t.detach()
    if t.is_quantized:
        return _encode_quantized(t)
    if t.dtype == torch.bool or t.dim() == 0:
        return {"t": "raw", "v": t}
    mask = t != 0
    nnz = int(mask.sum())
    if not _worth_it(t.numel(), nnz, t.element_size()):
        return {"t": "raw", "v": t}
    return {"t": "bitmask", "shape": list(t.shape), "bits": _pack(mask), "values": t[mask].clone()}


def _zero_points(q: torch.Tensor) -> torch.Tensor:
    """The zero point of every element (the integer that stands for 0.0)."""
    if q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return torch.full(q.shape, int(q.q_zero_point()), dtype=torch.int64)
    zp = q.q_per_channel_zero_points().to(torch.int64)
    shape = [1] * q.dim()
    shape[q.q_per_channel_axis()] = -1
    return zp.reshape(shape).expand(q.shape)


def _encode_quantized(q: torch.Tensor) -> dict[str, Any]:
    scheme = q.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        qparams: dict[str, Any] = {"scheme": "tensor", "scale": float(q.q_scale()), "zero_point": int(q.q_zero_point())}
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        qparams = {
            "scheme": "channel",
            "scales": q.q_per_channel_scales().clone(),
            "zero_points": q.q_per_channel_zero_points().clone(),
            "axis": int(q.q_per_channel_axis()),
        }
    else:  # e.g. float-qparams schemes: keep torch's own serialization
        return {"t": "raw", "v": q}
    ints = q.int_repr()
    mask = ints.to(torch.int64) != _zero_points(q)
    nnz = int(mask.sum())
    if not _worth_it(q.numel(), nnz, ints.element_size()):
        return {"t": "raw", "v": q}
    return {
        "t": "qbitmask", "shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch."),
        "bits": _pack(mask), "values": ints[mask].clone(), **qparams,
    }


def _decode_tensor(e: dict[str, Any]) -> torch.Tensor:
    numel = math.prod(int(d) for d in e["shape"])
    # The bitmask holds one bit per element: a shape larger than it is a damaged file,
    # refused before anything of that size is allocated.
    if not 0 <= numel <= 8 * e["bits"].numel():
        raise ValueError(f"a sparse tensor announces shape {e['shape']} but its bitmask covers {8 * e['bits'].numel()} elements")
    mask = _unpack(e["bits"], numel)
    if int(mask.sum()) != e["values"].numel():
        raise ValueError("a sparse tensor's values do not match its bitmask")
    if e["t"] == "bitmask":
        out = torch.zeros(numel, dtype=e["values"].dtype)
        out[mask] = e["values"]
        return out.reshape(e["shape"])
    # The integer dtype picks the quantized one (int8 → qint8, uint8 → quint8, int32 → qint32).
    ints_dtype = e["values"].dtype
    if e["scheme"] == "tensor":
        out = torch.full((numel,), e["zero_point"], dtype=ints_dtype)
        out[mask] = e["values"]
        return torch._make_per_tensor_quantized_tensor(out.reshape(e["shape"]), e["scale"], e["zero_point"])
    shape = [1] * len(e["shape"])
    shape[e["axis"]] = -1
    out = e["zero_points"].to(ints_dtype).reshape(shape).expand(e["shape"]).reshape(-1).clone()
    out[mask] = e["values"]
    return torch._make_per_channel_quantized_tensor(out.reshape(e["shape"]), e["scales"], e["zero_points"], e["axis"])


def _encode_value(v: Any) -> dict[str, Any]:
    if isinstance(v, torch.Tensor):
        return _encode_tensor(v)
    if isinstance(v, (tuple, list)):
        return {"t": type(v).__name__, "v": [_encode_value(x) for x in v]}
    return {"t": "raw", "v": v}


def _decode_value(e: dict[str, Any]) -> Any:
    kind = e["t"]
    if kind == "raw":
        return e["v"]
    if kind == "tuple":
        return tuple(_decode_value(x) for x in e["v"])
    if kind == "list":
        return [_decode_value(x) for x in e["v"]]
    return _decode_tensor(e)


def encode(state: dict[str, Any]) -> dict[str, Any]:
    """Encode a state dict; module versions (``_metadata``) are kept as plain data."""
    meta = getattr(state, "_metadata", None)
    return {
        "entries": {k: _encode_value(v) for k, v in state.items()},
        "metadata": {k: dict(v) for k, v in meta.items()} if meta is not None else None,
    }


def decode(payload: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``encode``: the exact state dict, ``_metadata`` included."""
    state: OrderedDict[str, Any] = OrderedDict((k, _decode_value(e)) for k, e in payload["entries"].items())
    if payload.get("metadata") is not None:
        state._metadata = OrderedDict(payload["metadata"])  # type: ignore[attr-defined]
    return state


register_storage(NAME, Storage(encode=encode, decode=decode))
