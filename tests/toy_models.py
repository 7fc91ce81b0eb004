"""Small user modules for ``arch: module`` tests (``import: tests.toy_models:ResNetTiny``)."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity: the residual add ties both convs' channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class ResNetTiny(nn.Module):
    """A two-block ResNet for 1×8×8 digits: stem, residual blocks, global average pool, fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width), _Block(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def prune_structurally(model: nn.Module, header):
    """Remove half of every hidden layer's neurons/channels in place with the real
    ``structured`` handler; return the header whose transform rebuilds the result."""
    from schemas.prune import StructuredPrune
    from shrinkflow.pruning.structured import StructuredPruner

    pruner = StructuredPruner(model, StructuredPrune(method="structured"), header.input_shape)
    pruner.step()
    return header.with_transform(**pruner.entry())
