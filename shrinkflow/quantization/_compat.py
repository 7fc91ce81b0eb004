"""The torch.ao warnings we filter at our call sites, and why.

torch 2.13 marks ``torch.ao.quantization`` deprecated (in favour of torchao) and
warns on every call, and its quantized modules warn that creating quantized
tensors is deprecated. We keep torch.ao where it is still the path with fast int8
CPU kernels and a state dict that loads with ``weights_only=True`` (``dynamic.py``),
and to load files of the former FX static path (``static_fx.py``); users' logs
should not fill with warnings about a choice made here, so these known messages,
and only these, are silenced around our calls.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other")
        # Rebuilding on load converts an uncalibrated model: its scales are then
        # overwritten by the file's, so the "run observer first" warning is moot.
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        # torch's own (de)serialisation of quantized tensors uses the deprecated TypedStorage.
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        yield
