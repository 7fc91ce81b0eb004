"""Model architectures and the one function that builds them from a spec.

A spec is plain data (see ``schemas.common.ModelSpec``) so that a checkpoint can
carry its architecture without pickling any Python object. A spec naming a user
class (``arch: module``) is built only when its module is trusted (``allow``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrinkflow.errors import InputError, UntrustedModel


class MLP(nn.Module):
    """Fully connected network: flatten → [Linear → ReLU]* → Linear.

    LeNet-300-100 is ``MLP(784, [300, 100], 10)``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example (the network of Han et al. 2015/2016).

    conv5×5(20) → maxpool2 → conv5×5(50) → maxpool2 → fc(500) → ReLU → fc(out).
    ``padding`` keeps small inputs (8×8 digits) large enough for both convolutions.
    """

    def __init__(self, in_shape: Sequence[int], out_features: int, padding: int = 0) -> None:
        super().__init__()
        channels = in_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 20, 5, padding=padding),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=padding),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 500),
            nn.ReLU(),
            nn.Linear(500, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5_padding(in_shape: Sequence[int], padding: int | None) -> int:
    """Padding for LeNet-5: as given, else 0 for inputs of 16 pixels or more, else 2."""
    if padding is not None:
        return padding
    return 0 if min(in_shape[1:]) >= 16 else 2


def _allowed(module_name: str, attr: str, allow: Sequence[str]) -> bool:
    """``module:Class`` is allowed by an entry naming it, its module, or a package above it."""
    for entry in allow:
        mod, sep, cls = entry.partition(":")
        if sep and mod == module_name and cls == attr:
            return True
        if not sep and (module_name == mod or module_name.startswith(mod + ".")):
            return True
    return False


def module_class(target: str, allow: Sequence[str], where: str = "model spec") -> type[nn.Module]:
    """The ``nn.Module`` subclass ``"package.module:ClassName"`` names, imported only when trusted.

    Importing a module runs its top-level code, so only modules in ``allow`` (module
    names, which also cover their submodules, or exact ``module:Class`` targets) are
    imported; the object must be an ``nn.Module`` subclass before anything is called.

    Raises:
        UntrustedModel: ``target`` is not in ``allow``.
        InputError: the import fails, or the object is not an ``nn.Module`` subclass.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{where}: expected 'package.module:ClassName', got {target!r}")
    if not _allowed(module_name, attr, allow):
        raise UntrustedModel(
            f"{where} names the class {target!r}: loading it would import and run the code of {module_name!r}. "
            f"If you trust that code, allow it: shrinkflow.load(path, allow=[{module_name!r}]), "
            f"`--allow {module_name}` on the command line, or `trusted_modules: [{module_name}]` in params.yaml"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{where}: cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = "nothing" if cls is None else f"a {type(cls).__name__}"
        raise InputError(f"{where}: {target!r} is {what}, not a torch.nn.Module subclass")
    return cls


def estimate_params(spec: Any, in_shape: Sequence[int], out_features: int) -> int | None:
    """Parameters a built-in architecture will have, from the spec alone (None for user modules)."""
    if spec.arch == "mlp":
        widths = [math.prod(int(d) for d in in_shape), *spec.hidden, out_features]
        return sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    if spec.arch == "lenet5":
        c = int(in_shape[0]) if in_shape else 1
        pixels = math.prod(int(d) for d in in_shape[1:]) if len(in_shape) > 1 else 1
        return c * 20 * 25 + 20 + 20 * 50 * 25 + 50 + 50 * pixels * 500 + 500 + 500 * out_features + out_features
    return None


def build_model(spec: Any, in_shape: Sequence[int], out_features: int, allow: Sequence[str] = ()) -> nn.Module:
    """Build an untrained model from a spec (``schemas.common.ModelSpec``).

    Args:
        spec: ``MLPSpec`` (``{"arch": "mlp", "hidden": [..]}``), ``LeNet5Spec`` or
            ``ModuleSpec`` (``{"arch": "module", "import": "pkg.mod:Class", "kwargs": {..}}``).
            A user module is built as ``Class(**kwargs)``; it must accept inputs of
            ``in_shape`` (batch first) and return ``out_features`` outputs.
        in_shape: shape of one input without the batch dimension, e.g. ``[1, 8, 8]``.
        out_features: number of classes, or 1 for regression.
        allow: modules trusted to be imported for ``arch: module`` (see ``module_class``).
    """
    arch = spec.arch
    if arch == "mlp":
        return MLP(math.prod(int(d) for d in in_shape), list(spec.hidden), out_features)
    if arch == "lenet5":
        if len(in_shape) != 3:
            raise InputError(
                f"lenet5 needs image inputs shaped [channels, height, width], got {list(in_shape)}; "
                "use arch: mlp for tabular data"
            )
        return LeNet5(in_shape, out_features, lenet5_padding(in_shape, spec.padding))
    if arch == "module":
        cls = module_class(spec.import_, allow)
        try:
            return cls(**dict(spec.kwargs))
        except Exception as exc:  # a user class refusing its kwargs
            raise InputError(f"{spec.import_}(**{dict(spec.kwargs)}) failed: {type(exc).__name__}: {exc}") from exc
    raise InputError(f"unknown arch {arch!r}")  # pragma: no cover - the schema forbids it


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return (all parameters, non-zero parameters) of a float model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero
