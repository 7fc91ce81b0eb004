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


class FlatOrImageResNet(ResNetTiny):
    """ResNetTiny whose forward also takes flat inputs: it branches on the input's rank, which
    torch.fx cannot trace (torch.export captures the branch taken)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], 1, 8, 8)
        return super().forward(x)


class UserLSTM(nn.Module):
    """A user's two-layer LSTM over the rows of 1×8×8 digits."""

    def __init__(self, hidden: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 8, 8))
        return self.fc(out[:, -1])


class TimmAttention(nn.Module):
    """Attention as timm writes it: fused qkv, a ``num_heads`` count, a ``head_dim``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class UserViT(nn.Module):
    """A user's one-block ViT on 2×2 patches of digits, with timm-style attention."""

    def __init__(self, dim: int = 16, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class UserEncoder(nn.Module):
    """A user's Transformer built from torch's nn.TransformerEncoder (nn.MultiheadAttention inside)."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))


def prune_structurally(model: nn.Module, header):
    """Remove half of every hidden layer's neurons/channels in place with the real
    ``structured`` handler; return the header whose transform rebuilds the result."""
    from schemas.prune import StructuredPrune
    from shrinkflow.pruning.structured import StructuredPruner

    pruner = StructuredPruner(model, StructuredPrune(method="structured"), header.input_shape)
    pruner.step()
    return header.with_transform(**pruner.entry())
