"""Model architectures and the one function that builds them from a spec.

A spec is plain data (see ``schemas.common.ModelSpec``) so that a checkpoint can
carry its architecture without pickling any Python object. A spec naming a user
class (``arch: module``) is built only when its module is trusted (``allow``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Sequence
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


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand → 3×3 depthwise → 1×1 project, each with BatchNorm.

    The input is added back when the block keeps resolution and width (the residual
    that ties the channels of every block of a stage together).
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """A small residual CNN of MobileNetV2 blocks (depthwise-separable convolutions, BatchNorm).

    stem conv3×3 → per stage ``blocks`` inverted-residual blocks (the first of each
    stage after the first halves the resolution) → global average pool → Linear.
    """

    def __init__(
        self, in_shape: Sequence[int], out_features: int, widths: Sequence[int] = (16, 32, 64), blocks: int = 2,
        expansion: int = 2, stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_shape[0], widths[0], 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                layers.append(InvertedResidual(cin, width, 2 if i > 0 and b == 0 else 1, expansion))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def sequence_shape(in_shape: Sequence[int]) -> tuple[int, int]:
    """(time steps, features per step) of an input: image rows as steps (28 rows of 28 pixels for
    MNIST, channels side by side), or a ``[steps, features]`` input as it is."""
    dims = [int(d) for d in in_shape]
    if len(dims) == 3:
        return dims[1], dims[0] * dims[2]
    if len(dims) == 2:
        return dims[0], dims[1]
    raise InputError(
        f"a recurrent model needs sequence inputs shaped [steps, features] or images [channels, height, width], "
        f"got {dims}; use arch: mlp for flat tabular data"
    )


class RNNClassifier(nn.Module):
    """LSTM or GRU over the input's rows (sequential MNIST), classified from the last step's output.

    The recurrent layers are one ``nn.LSTM``/``nn.GRU`` of ``layers`` layers, so
    ``torch.ao`` dynamic int8 and the structured pruner see the layer users write.
    """

    def __init__(self, in_shape: Sequence[int], out_features: int, cell: str = "lstm", hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.steps, self.features = sequence_shape(in_shape)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(self.features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], self.steps, self.features))
        return self.head(out[:, -1])


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (as timm's ViT).

    The number of heads is read from the layer's width (``qkv`` holds 3 × heads ×
    ``head_dim`` outputs), so removing whole heads from ``qkv`` and ``proj`` is all
    structured pruning has to do.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        heads = self.qkv.out_features // (3 * self.head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, heads * self.head_dim))


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """A small Transformer encoder on image patches (ViT): patch embedding, learned positions,
    pre-norm encoder blocks, mean pooling over patches, LayerNorm, Linear."""

    def __init__(
        self, in_shape: Sequence[int], out_features: int, patch: int = 7, dim: int = 64, depth: int = 2, heads: int = 4,
        mlp: int = 128,
    ) -> None:
        super().__init__()
        channels, height, width = (int(d) for d in in_shape)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (height // patch) * (width // patch), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


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
    if spec.arch in BUILT_IN:
        try:  # built on the meta device: shapes only, nothing allocated
            with torch.device("meta"):
                model = build_model(spec, in_shape, out_features)
        except InputError:
            return None  # the spec does not fit the input: building it later says why
        return sum(p.numel() for p in model.parameters())
    return None


def _image_shape(arch: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise InputError(
            f"{arch} needs image inputs shaped [channels, height, width], got {list(in_shape)}; "
            "use arch: mlp for tabular data"
        )
    c, h, w = (int(d) for d in in_shape)
    return c, h, w


def _patch(spec: Any, in_shape: Sequence[int]) -> int:
    """The transformer's patch side: as given, else a quarter of the image side; it must divide both sides."""
    _, h, w = _image_shape("transformer", in_shape)
    patch = spec.patch if spec.patch is not None else max(1, min(h, w) // 4)
    if h % patch or w % patch:
        raise InputError(f"transformer: patch {patch} does not divide the {h}×{w} image; set patch to a divisor of both sides")
    return patch


#: Architectures built here from their spec (``arch: module`` is the user's own class).
BUILT_IN = ("mlp", "lenet5", "mobilenet", "lstm", "gru", "transformer")


def build_model(spec: Any, in_shape: Sequence[int], out_features: int, allow: Sequence[str] = ()) -> nn.Module:
    """Build an untrained model from a spec (``schemas.common.ModelSpec``).

    Args:
        spec: ``MLPSpec`` (``{"arch": "mlp", "hidden": [..]}``), ``LeNet5Spec``,
            ``MobileNetSpec``, ``LSTMSpec``, ``GRUSpec``, ``TransformerSpec`` or ``ModuleSpec`` (``{"arch": "module", "import": "pkg.mod:Class", "kwargs": {..}}``).
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
        _image_shape(arch, in_shape)
        return LeNet5(in_shape, out_features, lenet5_padding(in_shape, spec.padding))
    if arch == "mobilenet":
        c, h, w = _image_shape(arch, in_shape)
        stride = spec.stem_stride if spec.stem_stride is not None else (2 if min(h, w) >= 16 else 1)
        return MobileNet(in_shape, out_features, list(spec.widths), spec.blocks, spec.expansion, stride)
    if arch in ("lstm", "gru"):
        return RNNClassifier(in_shape, out_features, arch, spec.hidden, spec.layers)
    if arch == "transformer":
        return VisionTransformer(in_shape, out_features, _patch(spec, in_shape), spec.dim, spec.depth, spec.heads, spec.mlp)
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


def forward_with_hooks(
    model: nn.Module, x: torch.Tensor, modules: Iterable[nn.Module], hook: Callable[..., Any], *, pre: bool = False
) -> torch.Tensor:
    """``model(x)`` without gradients, with ``hook`` on each of ``modules`` for that one call: a forward
    hook ``hook(module, inputs, output)``, or with ``pre`` a forward pre-hook ``hook(module, inputs)``."""
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()
