"""Loading any shrinkflow model file: ``shrinkflow.load(path)``.

The top of the compression library: it imports every method package so that each
transform and storage a file may name is registered, and reads both formats (a
``.pt`` model file, or a packed ``.sfz`` recognised by its magic bytes, whatever the
file is called). Loading never runs code from the file: ``.pt`` files are read with
``torch.load(weights_only=True)``, ``.sfz`` files are bytes and JSON, both rebuild the
architecture from data in their header, and a header that names a user class is
built only when the caller trusts its module (``allow``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import shrinkflow.pruning  # noqa: F401 - registers the pruning transforms and the sparse storage
import shrinkflow.quantization  # noqa: F401 - registers the quantization transforms
from shrinkflow.artifacts import ModelHeader, build_and_load, read_model_file, read_torch_payload, save_model
from shrinkflow.errors import InputError
from shrinkflow.packing import PackReport, is_packed, load_packed, pack_model

__all__ = ["load", "load_checkpoint", "load_model", "pack_file", "save_model"]


def load_model(path: str | os.PathLike[str], allow: Sequence[str] = ()) -> tuple[nn.Module, ModelHeader]:
    """Rebuild a variant from its file, in eval mode, on CPU: (model, header).

    Args:
        allow: Python modules trusted to be imported when the file's header names a
            user class (``arch: module``), e.g. ``["mypkg.nets"]``; built-in
            architectures need none.

    Raises:
        InputError: the file is missing, not a model file, damaged, or names a class
            whose module is not allowed (``UntrustedModel``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if is_packed(path):
        return load_packed(path, allow)
    header, state = read_model_file(path)
    return build_and_load(header, state, str(path), allow), header


def load(path: str | os.PathLike[str], allow: Sequence[str] = ()) -> nn.Module:
    """Load a shrinkflow model file (``.pt`` or packed ``.sfz``) for inference.

    ``shrinkflow.load("models/distill/model.pt")``; a model of your own class needs its
    module trusted: ``shrinkflow.load("net.sfz", allow=["mypkg.nets"])``.
    """
    return load_model(path, allow)[0]


def load_checkpoint(path: Path, header: ModelHeader, where: str, allow: Sequence[str] = ()) -> tuple[nn.Module, ModelHeader]:
    """Import a trained model: a shrinkflow file (``.pt`` / ``.sfz``, its own header) or a
    plain state dict for ``header``'s architecture, read with ``weights_only=True``.

    Args:
        where: the params key that named the file, for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where} {str(path)!r}: file not found")
    if is_packed(path):
        return load_model(path, allow)
    payload = read_torch_payload(path, f"{where} {str(path)!r}")
    if isinstance(payload, dict) and "shrinkflow" in payload:
        return load_model(path, allow)
    if not isinstance(payload, dict):
        raise InputError(f"{where} {str(path)!r} holds a {type(payload).__name__}, not a state dict: save it with torch.save(model.state_dict(), path)")
    return build_and_load(header, payload, f"{where} {str(path)!r} (for the model spec {header.spec.model_dump()})", allow), header


def pack_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, entropy: bool = True, allow: Sequence[str] = (),
    reference: torch.Tensor | None = None,
) -> PackReport:
    """Pack a shrinkflow model file (``.pt`` or ``.sfz``) into ``dst``.

    ``reference``: inputs whose predicted classes the packed file must keep (float
    tensors may then be stored as float16, see ``pack_model``); None = lossless.
    """
    model, header = load_model(Path(src), allow)
    return pack_model(model, header, dst, entropy=entropy, reference=reference)
