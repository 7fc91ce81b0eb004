"""Model files: one self-describing file per variant, loaded without running code from it.

A model file is ``torch.save`` of a plain dict::

    {"shrinkflow": 1,                 # file format version
     "header": {...},                 # ModelHeader as JSON-able data
     "state": {...}}                  # the weights, encoded by ``header.storage``

and is read back with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers. The architecture is rebuilt from the header: the
spec builds the original model, then each entry of ``header.transforms`` rebuilds
it the way the method that added the entry changed it (quantization, structural
pruning, ...), and finally the state dict is loaded into it.

Trust: a header may name a built-in architecture, or a user class (``arch:
module``) that is imported only when the caller allows its module (``allow``). Every
size in the header is bounded before anything is allocated (``MAX_PARAMS``...), and
transforms and storages are looked up in registries, never imported by name.

Methods extend the format by registering a *transform* (an architecture change, named
like the method) or a *storage* (an encoding of the state dict); other file formats
register a *reader* (the packed ``.sfz``). This module imports none of them back:
``shrinkflow.loading`` imports them all and is what callers use to load a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from schemas.common import ModelSpec
from shrinkflow.errors import InputError
from shrinkflow.io import atomic_path, model_file_kind
from shrinkflow.masks import keep_masked, masks_from_zeros
from shrinkflow.models import build_model, estimate_params

FORMAT_VERSION = 1
#: Bounds checked on a header before anything is built: a file cannot make the
#: loader allocate more than this (2**28 float32 parameters = 1 GiB).
MAX_PARAMS = 2**28
MAX_INPUT_ELEMENTS = 2**24
MAX_OUT_FEATURES = 2**20
MAX_TRANSFORMS = 64

#: Transform names written by shrinkflow 0.1 files, and the method each is now named after.
LEGACY_KINDS = {"dynamic-int8": "dynamic", "static-int8": "static", "structured-prune": "structured"}

Dim = Annotated[int, Field(ge=1, le=2**16)]


class ModelHeader(BaseModel):
    """Everything needed to rebuild a variant's architecture, as data."""

    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    spec: ModelSpec = Field(description="The model spec the original model was built from.")
    input_shape: list[Dim] = Field(min_length=1, max_length=4)
    out_features: int = Field(ge=1, le=MAX_OUT_FEATURES)
    task: Literal["classification", "regression"]
    transforms: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=MAX_TRANSFORMS,
        description="Architecture changes in the order they were made; each has a 'kind' (the method's name).",
    )
    storage: str = Field("dense", max_length=32, description="How 'state' encodes the state dict.")
    masked: bool = Field(False, description="True when zeros are pruned weights that later training must keep at zero.")

    @field_validator("transforms")
    @classmethod
    def _kinds(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for entry in value:
            kind = entry.get("kind")
            if not isinstance(kind, str):
                raise ValueError("every transform needs a 'kind' string")
            if kind == "static-int8" and entry.get("qat"):
                kind = "qat"
            out.append({**entry, "kind": LEGACY_KINDS.get(kind, kind)})
        return out

    @model_validator(mode="after")
    def _bounded(self) -> ModelHeader:
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {self.input_shape} exceeds {MAX_INPUT_ELEMENTS:,} elements")
        n = estimate_params(self.spec, self.input_shape, self.out_features)
        if n is not None and n > MAX_PARAMS:
            raise ValueError(f"the {self.spec.arch} it describes has {n:,} parameters, more than the {MAX_PARAMS:,} allowed")
        return self

    @classmethod
    def for_data(cls, spec: BaseModel, splits: Any) -> ModelHeader:
        """The header of a new model of ``spec`` (a params model spec) for ``splits``' inputs and task."""
        return cls(spec=spec, input_shape=splits.input_shape, out_features=splits.out_features, task=splits.task)

    @classmethod
    def parse(cls, data: Any, where: str) -> ModelHeader:
        """Validate a header read from a file; InputError naming the file when it is invalid."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "header"
            raise InputError(f"{where}: invalid model header ({loc}: {first['msg']}); the file is corrupt or not ours") from None

    def with_transform(self, kind: str, **data: Any) -> ModelHeader:
        return self.model_copy(update={"transforms": [*self.transforms, {"kind": kind, **data}]})

    @property
    def imports(self) -> list[str]:
        """The user classes (``module:Class``) this header needs imported to build."""
        return [self.spec.import_] if self.spec.arch == "module" else []

    def build(self, upto: int | None = None, allow: Sequence[str] = ()) -> nn.Module:
        """Build the untrained architecture, applying the first ``upto`` transforms (all by default).

        Args:
            allow: modules trusted to be imported when the spec names a user class.
        """
        model = build_model(self.spec, self.input_shape, self.out_features, allow)
        n = sum(p.numel() for p in model.parameters())
        if n > MAX_PARAMS:
            raise InputError(f"{self.imports[0] if self.imports else self.spec.arch} built {n:,} parameters, more than {MAX_PARAMS:,}")
        for t in self.transforms[:upto]:
            try:
                model = transform(t["kind"]).rebuild(model, t, self)
            except InputError:
                raise
            except Exception as exc:  # a transform entry that does not fit this architecture
                raise InputError(f"model header: transform {t['kind']!r} does not apply ({type(exc).__name__}: {exc})") from exc
        return model


@dataclass(frozen=True)
class Transform:
    """An architecture change a method made, replayable on an untrained model.

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


def _identity(state: dict[str, Any]) -> dict[str, Any]:
    return state


TRANSFORMS: dict[str, Transform] = {}
STORAGES: dict[str, Storage] = {"dense": Storage(encode=_identity, decode=_identity)}


def register_transform(kind: str, t: Transform) -> None:
    TRANSFORMS[kind] = t


def register_storage(name: str, s: Storage) -> None:
    STORAGES[name] = s


def transform(kind: str) -> Transform:
    try:
        return TRANSFORMS[kind]
    except KeyError:
        raise InputError(f"model file uses transform {kind!r}, which this version of shrinkflow does not know") from None


def save_model(model: nn.Module, path: Path, header: ModelHeader) -> int:
    """Write ``model`` atomically as a ``.pt`` model file; return the file's size in bytes."""
    if header.storage not in STORAGES:
        raise ValueError(f"storage {header.storage!r} is not registered (import shrinkflow.loading)")
    state = model.cpu().state_dict()
    payload = {
        "shrinkflow": FORMAT_VERSION,
        "header": header.model_dump(mode="json"),
        "state": STORAGES[header.storage].encode(state),
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return os.path.getsize(path)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` without torch's deprecation noise about quantized storages."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_torch_payload(path: Path, where: str) -> Any:
    """What ``torch.save`` stored in ``path``, read safely; InputError saying what the file is when it is not ours."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where}: file not found: {path}")
    if model_file_kind(path) != "torch":
        raise InputError(
            f"{where}: {path} is not a model file (neither a shrinkflow .pt nor a packed .sfz: "
            f"it starts with {_head(path)!r}); give a file written by shrinkflow or torch.save"
        )
    try:
        return _torch_load(path)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text:
            # torch's own advice (load with weights_only=False) would run the file's code: not repeated here.
            what = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise InputError(
                f"{where}: {path} holds Python objects that loading would have to run, refused"
                f"{f' ({what[:160]})' if what else ''}; save a plain state dict instead: torch.save(model.state_dict(), path)"
            ) from None
        msg = text.split("\n")[0][:200]
        raise InputError(f"{where}: {path} is a damaged or truncated torch file ({type(exc).__name__}: {msg})") from None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def read_model_file(path: Path) -> tuple[ModelHeader, dict[str, Any]]:
    """Read a ``.pt`` model file safely; return its header and decoded state dict."""
    path = Path(path)
    payload = read_torch_payload(path, "model file")
    if not isinstance(payload, dict) or "shrinkflow" not in payload:
        raise InputError(f"{path} is not a shrinkflow model file (no 'shrinkflow' version key): a plain state dict needs its model spec")
    version = payload["shrinkflow"]
    if not isinstance(version, int) or version < 1:
        raise InputError(f"{path}: invalid format version {version!r} (file corrupt)")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer shrinkflow (format {version}, this reads ≤ {FORMAT_VERSION}): upgrade shrinkflow")
    header = ModelHeader.parse(payload.get("header"), str(path))
    if header.storage not in STORAGES:
        raise InputError(f"{path} stores weights as {header.storage!r}, which this version of shrinkflow does not know")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise InputError(f"{path}: no state dict in the file (corrupt)")
    try:
        return header, STORAGES[header.storage].decode(state)
    except Exception as exc:
        raise InputError(f"{path}: the stored weights cannot be decoded ({type(exc).__name__}: {exc})") from None


def check_state(model: nn.Module, state: dict[str, Any], where: str) -> None:
    """Every tensor of ``state`` has the shape the architecture expects (nothing larger is decoded)."""
    expected = model.state_dict()
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and k in expected and isinstance(expected[k], torch.Tensor):
            if tuple(v.shape) != tuple(expected[k].shape):
                raise InputError(f"{where}: weight {k!r} is shaped {tuple(v.shape)}, the architecture in its header needs {tuple(expected[k].shape)}")


def build_and_load(header: ModelHeader, state: dict[str, Any], where: str, allow: Sequence[str] = (), upto: int | None = None) -> nn.Module:
    """The architecture of ``header`` holding ``state``, in eval mode."""
    import warnings

    with warnings.catch_warnings():
        # torch.ao quantized modules warn on creation (deprecated APIs) and before calibration;
        # the file's scales replace the uncalibrated ones.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other")
        model = header.build(upto=upto, allow=allow)
        check_state(model, state, where)
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: the stored weights do not fit the architecture in its header ({str(exc)[:300]})") from None
    return model.eval()


def float_index(header: ModelHeader) -> int:
    """Index of the first transform a float model cannot hold (len(transforms) if none)."""
    for i, entry in enumerate(header.transforms):
        if transform(entry["kind"]).to_float is not None:
            return i
    return len(header.transforms)


def to_float(model: nn.Module, header: ModelHeader) -> nn.Module:
    """A trainable float model with the same function and shapes as a (possibly quantized) variant.

    Built from the header; a user class it names is already imported (``model`` came from it).
    """
    i = float_index(header)
    if i == len(header.transforms):
        return model
    allow = header.imports
    return transform(header.transforms[i]["kind"]).to_float(model, header.build(upto=i, allow=allow))


def from_float(model: nn.Module, header: ModelHeader) -> nn.Module:
    """Inverse of ``to_float``: make the float-incompatible changes again on trained weights."""
    for entry in header.transforms[float_index(header):]:
        t = transform(entry["kind"])
        model = (t.reapply or t.rebuild)(model, entry, header)
    return model


def keep_constraints(float_model: nn.Module, header: ModelHeader) -> Callable[[nn.Module], None] | None:
    """An ``after_step`` hook that keeps a variant's compression while it trains.

    Pruned zeros stay zero (``header.masked``) and every transform with a
    ``constrain`` keeps its constraint; None when there is nothing to keep.
    """
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
