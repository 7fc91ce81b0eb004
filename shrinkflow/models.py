"""Model architectures and the one function that builds them from a spec.

A spec is plain data (see ``schemas.params.ModelSpec``) so that a checkpoint can
carry its architecture without pickling any Python object.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


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


def import_object(target: str) -> Any:
    """Import ``"package.module:Name"`` and return ``Name``.

    Raises:
        ValueError: the string is not of that form, or the import fails.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:ClassName', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from exc


def build_model(spec: dict[str, Any], in_shape: Sequence[int], out_features: int) -> nn.Module:
    """Build an untrained model from a spec dict.

    Args:
        spec: ``{"arch": "mlp", "hidden": [..]}``, ``{"arch": "lenet5", "padding": p}``
            or ``{"arch": "module", "import": "pkg.mod:Class", "kwargs": {..}}``. A user
            module is called as ``Class(**kwargs)``; it must accept inputs of
            ``in_shape`` (batch first) and return ``out_features`` outputs.
        in_shape: shape of one input without the batch dimension, e.g. ``[1, 8, 8]``.
        out_features: number of classes, or 1 for regression.
    """
    arch = spec["arch"]
    if arch == "mlp":
        in_features = 1
        for d in in_shape:
            in_features *= int(d)
        return MLP(in_features, list(spec.get("hidden", [])), out_features)
    if arch == "lenet5":
        if len(in_shape) != 3:
            raise ValueError(
                f"lenet5 needs image inputs shaped [channels, height, width], got {list(in_shape)}; "
                "use arch: mlp for tabular data"
            )
        return LeNet5(in_shape, out_features, lenet5_padding(in_shape, spec.get("padding")))
    if arch == "module":
        cls = import_object(spec["import"])
        model = cls(**dict(spec.get("kwargs") or {}))
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec['import']} did not build a torch.nn.Module")
        return model
    raise ValueError(f"unknown arch {arch!r}")


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return (all parameters, non-zero parameters) of a float model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero
