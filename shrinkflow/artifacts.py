"""Model files: one self-describing file per variant, loaded without unpickling code.

A model file is ``torch.save`` of a plain dict::

    {"shrinkflow": 1,                 # file format version
     "header": {...},                 # ModelHeader as JSON-able data
     "state": {...}}                  # the weights, encoded by ``header.storage``

and is read back with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers. The architecture is rebuilt from the header: the
spec builds the original model, then each entry of ``header.transforms`` rebuilds
it the way the stage that added the entry changed it (quantization, structural
pruning, ...), and finally the state dict is loaded into it.

Stages extend the format by registering a *transform* (an architecture change) or a
*storage* (an encoding of the state dict); the loader needs nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shrinkflow.errors import InputError
from shrinkflow.io import atomic_path
from shrinkflow.models import build_model

FORMAT_VERSION = 1


class ModelHeader(BaseModel):
    """Everything needed to rebuild a variant's architecture, as data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: dict[str, Any] = Field(description="The model spec the original model was built from.")
    input_shape: list[int]
    out_features: int
    task: Literal["classification", "regression"]
    transforms: list[dict[str, Any]] = Field(
        default_factory=list, description="Architecture changes in the order they were made; each has a 'kind'."
    )
    storage: str = Field("dense", description="How 'state' encodes the state dict.")
    masked: bool = Field(False, description="True when zeros are pruned weights that later training must keep at zero.")

    @classmethod
    def for_data(cls, spec: BaseModel, splits: Any) -> ModelHeader:
        """The header of a new model of ``spec`` (a params model spec) for ``splits``' inputs and task."""
        return cls(
            spec=spec.model_dump(mode="json", by_alias=True),
            input_shape=splits.input_shape,
            out_features=splits.out_features,
            task=splits.task,
        )

    def with_transform(self, kind: str, **data: Any) -> ModelHeader:
        return self.model_copy(update={"transforms": [*self.transforms, {"kind": kind, **data}]})

    def build(self, upto: int | None = None) -> nn.Module:
        """Build the untrained architecture, applying the first ``upto`` transforms (all by default)."""
        model = build_model(self.spec, self.input_shape, self.out_features)
        for t in self.transforms[:upto]:
            model = transform(t["kind"]).rebuild(model, t, self)
        return model


@dataclass(frozen=True)
class Transform:
    """An architecture change a stage made, replayable on an untrained model.

    rebuild: turn the untrained model into the changed architecture (weights are
        loaded afterwards, so values do not matter).
    to_float: return a trainable float model holding the same function as the
        changed model (for training that must continue from it), built on
        ``header.build(upto=index)``.
    reapply: make the change again on a trained float model (default: rebuild).
    constrain: given the float model from ``to_float`` and the entry, return an
        ``after_step`` hook that keeps training inside the change (e.g. weights tied
        to a codebook), so ``reapply`` after training loses nothing.
    """

    rebuild: Callable[[nn.Module, dict[str, Any], ModelHeader], nn.Module]
    to_float: Callable[[nn.Module, nn.Module], nn.Module] | None = None
    reapply: Callable[[nn.Module, dict[str, Any], ModelHeader], nn.Module] | None = None
    constrain: Callable[[nn.Module, dict[str, Any]], Callable[[nn.Module], None]] | None = None


@dataclass(frozen=True)
class Storage:
    """An encoding of a state dict into tensors and plain containers.

    Keep the state dict's ``_metadata`` (module versions): quantized modules read it
    when loading.
    """

    encode: Callable[[dict[str, Any]], dict[str, Any]]
    decode: Callable[[dict[str, Any]], dict[str, Any]]


TRANSFORMS: dict[str, Transform] = {}
def _identity(state: dict[str, Any]) -> dict[str, Any]:
    return state


STORAGES: dict[str, Storage] = {"dense": Storage(encode=_identity, decode=_identity)}


def register_transform(kind: str, t: Transform) -> None:
    TRANSFORMS[kind] = t


def register_storage(name: str, s: Storage) -> None:
    STORAGES[name] = s


def _load_plugins() -> None:
    # Transforms and storages register themselves when their module is imported.
    import shrinkflow.pruning  # noqa: F401
    import shrinkflow.quantization  # noqa: F401


def transform(kind: str) -> Transform:
    _load_plugins()
    try:
        return TRANSFORMS[kind]
    except KeyError:
        raise InputError(f"model file uses transform {kind!r}, which this version of shrinkflow does not know") from None


def save_model(model: nn.Module, path: Path, header: ModelHeader) -> int:
    """Write ``model`` atomically; return the file's size in bytes."""
    _load_plugins()
    state = model.cpu().state_dict()
    payload = {
        "shrinkflow": FORMAT_VERSION,
        "header": header.model_dump(mode="json"),
        "state": STORAGES[header.storage].encode(state),
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return os.path.getsize(path)


def read_model_file(path: Path) -> tuple[ModelHeader, dict[str, Any]]:
    """Read a model file safely; return its header and decoded state dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    from shrinkflow.quantization._compat import quiet_torch_ao

    try:
        with quiet_torch_ao():  # quantized tensors in the file: torch warns about its own storage classes
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise InputError(f"{path} is not a readable shrinkflow model file (loaded with weights_only=True): {exc}") from exc
    if not isinstance(payload, dict) or "shrinkflow" not in payload:
        raise InputError(f"{path} is not a shrinkflow model file (no 'shrinkflow' version key)")
    if payload["shrinkflow"] > FORMAT_VERSION:
        raise InputError(
            f"{path} was written by a newer shrinkflow (format {payload['shrinkflow']}, this reads ≤ {FORMAT_VERSION}): upgrade shrinkflow"
        )
    header = ModelHeader.model_validate(payload["header"])
    _load_plugins()
    if header.storage not in STORAGES:
        raise InputError(f"{path} stores weights as {header.storage!r}, which this version of shrinkflow does not know")
    with quiet_torch_ao():
        return header, STORAGES[header.storage].decode(payload["state"])


def load_model(path: Path) -> tuple[nn.Module, ModelHeader]:
    """Rebuild a variant from its file, in eval mode, on CPU.

    Packed files (``.sfz``, see ``shrinkflow.packing``) are recognised by their
    magic bytes and read by the packed loader.
    """
    from shrinkflow.packing import is_packed, load_packed

    if is_packed(path):
        return load_packed(path)
    from shrinkflow.quantization._compat import quiet_torch_ao

    header, state = read_model_file(path)
    with quiet_torch_ao():
        model = header.build()
        model.load_state_dict(state)
    return model.eval(), header


def load_checkpoint(path: Path, header: ModelHeader, where: str) -> tuple[nn.Module, ModelHeader]:
    """Import a trained model: a shrinkflow file (``.pt`` / ``.sfz``, its own header) or a
    plain state dict for ``header``'s architecture, read with ``weights_only=True``.

    Args:
        where: the params key that named the file, for error messages.
    """
    from shrinkflow.packing import is_packed
    from shrinkflow.quantization._compat import quiet_torch_ao

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where} {str(path)!r}: file not found")
    if is_packed(path):
        return load_model(path)
    try:
        with quiet_torch_ao():
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"{where} {str(path)!r} cannot be loaded with weights_only=True ({exc}); "
            "save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(payload, dict) and "shrinkflow" in payload:
        return load_model(path)
    model = header.build()
    try:
        model.load_state_dict(payload)
    except Exception as exc:
        raise InputError(f"{where} {str(path)!r} does not fit the model spec ({header.spec}): {exc}") from exc
    return model.eval(), header


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Load a shrinkflow model file (``.pt`` or packed ``.sfz``) for inference: ``shrinkflow.load("models/distill/model.pt")``."""
    return load_model(Path(path))[0]


def _float_index(header: ModelHeader) -> int:
    """Index of the first transform a float model cannot hold (len(transforms) if none)."""
    for i, entry in enumerate(header.transforms):
        if transform(entry["kind"]).to_float is not None:
            return i
    return len(header.transforms)


def to_float(model: nn.Module, header: ModelHeader) -> nn.Module:
    """A trainable float model with the same function and shapes as a (possibly quantized) variant."""
    i = _float_index(header)
    if i == len(header.transforms):
        return model
    return transform(header.transforms[i]["kind"]).to_float(model, header.build(upto=i))


def from_float(model: nn.Module, header: ModelHeader) -> nn.Module:
    """Inverse of ``to_float``: make the float-incompatible changes again on trained weights."""
    for entry in header.transforms[_float_index(header):]:
        t = transform(entry["kind"])
        model = (t.reapply or t.rebuild)(model, entry, header)
    return model


def keep_constraints(float_model: nn.Module, header: ModelHeader) -> Callable[[nn.Module], None] | None:
    """An ``after_step`` hook that keeps a variant's compression while it trains.

    Pruned zeros stay zero (``header.masked``) and every transform with a
    ``constrain`` keeps its constraint; None when there is nothing to keep.
    """
    from shrinkflow.pruning import keep_masked, masks_from_zeros

    hooks = [keep_masked(masks_from_zeros(float_model))] if header.masked else []
    for entry in header.transforms:
        t = transform(entry["kind"])
        if t.constrain is not None:
            hooks.append(t.constrain(float_model, entry))
    if not hooks:
        return None

    def hook(model: nn.Module) -> None:
        for h in hooks:
            h(model)

    return hook
