"""Dead units leave the file: neurons/channels without weights are removed, the file stores the smaller
architecture, and the outputs stay the same (up to float32 summation order)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO

import shrinkflow
from schemas.paths import StagePaths
from shrinkflow.artifacts import ModelHeader, save_model
from shrinkflow.config import load_params
from shrinkflow.loading import load_model
from shrinkflow.packing import pack_model
from shrinkflow.pruning import remove_dead_units
from tasks.run import run_stage


def _header(spec: dict, shape=(1, 8, 8)) -> ModelHeader:
    return ModelHeader(spec=spec, input_shape=list(shape), out_features=10, task="classification")


def _kill(model: torch.nn.Module) -> dict[str, int]:
    """Zero the incoming weights of the first third of every hidden layer's units (their output is then the
    constant act(bias)) and the outgoing weights of the next sixth (nobody reads them); return how many each layer lost."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    dead = {}
    with torch.no_grad():
        for (name, mod), (_, nxt) in zip(layers, layers[1:], strict=False):
            n = mod.weight.shape[0]
            mod.weight[: n // 3] = 0
            dead[name] = n // 3
            if nxt.weight.shape[1] == n:  # a reader whose inputs are this layer's units, one to one
                nxt.weight[:, n // 3 : n // 2] = 0
                dead[name] += n // 2 - n // 3
    return dead


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same predictions; outputs equal up to float32 rounding (a product over fewer terms sums in another order)."""
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize(
    "spec, shape",
    [({"arch": "mlp", "hidden": [48, 24]}, (1, 8, 8)), ({"arch": "lenet5"}, (1, 28, 28))],
    ids=["mlp", "lenet5-unpadded"],
)
def test_dead_units_leave_and_outputs_stay(spec, shape, tmp_path):
    h = _header(spec, shape)
    torch.manual_seed(0)
    model = h.build().eval()
    expected = _kill(model)
    X = torch.randn(200, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(X)
    small, hs, removed = remove_dead_units(copy.deepcopy(model), h)
    assert removed == {k: v for k, v in expected.items() if k in removed} and removed
    assert hs.transforms[-1]["kind"] == "structured"
    with torch.no_grad():
        _close(before, small(X))
    # The file stores the smaller architecture and loads to the same outputs (.pt and packed).
    n_before = sum(p.numel() for p in model.parameters())
    save_model(small, tmp_path / "s.pt", hs)
    rep = pack_model(small, hs, tmp_path / "s.sfz")
    for path in (tmp_path / "s.pt", tmp_path / "s.sfz"):
        loaded, header = load_model(path)
        assert header == hs
        assert sum(p.numel() for p in loaded.parameters()) < n_before
        with torch.no_grad():
            assert torch.equal(loaded(X), small(X))
    assert rep.breakdown["structure"] > 0


def test_mlp_removal_counts_are_exact():
    h = _header({"arch": "mlp", "hidden": [48, 24]})
    torch.manual_seed(0)
    model = h.build().eval()
    _kill(model)
    small, _, removed = remove_dead_units(model, h)
    # net.1: 16 without inputs + 8 unread; net.3: 8 + 4; the output layer keeps its 10 units.
    assert removed == {"net.1": 24, "net.3": 12}
    assert [m.weight.shape for m in small.modules() if isinstance(m, torch.nn.Linear)] == [(24, 64), (12, 24), (10, 12)]


def test_a_constant_that_padding_would_spread_unevenly_is_kept():
    """LeNet-5 on 8×8 inputs pads its convolutions: a channel without weights but with a non-zero bias sends a
    constant that the padded next convolution sees unevenly; it cannot be folded into a bias, so it stays."""
    h = _header({"arch": "lenet5"})
    torch.manual_seed(0)
    model = h.build().eval()
    conv1 = model.features[0]
    with torch.no_grad():
        conv1.weight[:4] = 0
        conv1.bias[:2] = 0.0  # constant 0: removable
        conv1.bias[2:4] = 0.5  # constant 0.5 into a padded convolution: kept
    X = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        before = model(X)
    small, _, removed = remove_dead_units(copy.deepcopy(model), h)
    assert removed.get("features.0") == 2
    assert small.features[0].weight.shape[0] == 18
    with torch.no_grad():
        _close(before, small(X))


def test_residual_and_batchnorm_user_module(repo_on_path):
    """Channels tied by a residual add go only when every coupled layer lost them; the outputs stay."""
    spec = {"arch": "module", "import": "tests.toy_models:ResNetTiny", "kwargs": {"width": 8}}
    h = _header(spec)
    allow = ["tests.toy_models"]
    torch.manual_seed(0)
    model = h.build(allow=allow).eval()
    with torch.no_grad():
        model.blocks[0].conv1.weight[:3] = 0  # inside a block: removable (its BatchNorm output is constant)
        model.blocks[0].bn1.bias[:3] = -1.0  # relu(bn(0)) = 0
        model.blocks[0].bn1.running_mean[:3] = 0.0
        model.stem[0].weight[:2] = 0  # on the residual path: other layers still write these channels
    X = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        before = model(X)
    small, hs, removed = remove_dead_units(copy.deepcopy(model), h)
    assert removed.get("blocks.0.conv1") == 3 and "stem.0" not in removed
    with torch.no_grad():
        _close(before, small(X))
    loaded = shrinkflow.load(_save(small, hs, repo_on_path), allow=allow)
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def _save(model, header, folder: Path) -> Path:
    path = folder / "r.pt"
    save_model(model, path, header)
    return path


@pytest.fixture
def repo_on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    return tmp_path


def test_nothing_dead_changes_nothing():
    h = _header({"arch": "mlp", "hidden": [16]})
    torch.manual_seed(0)
    model = h.build().eval()
    same, hs, removed = remove_dead_units(model, h)
    assert removed == {} and hs == h and same is not None


def test_the_prune_stage_removes_dead_units(tmp_path):
    """Through the stage: 99 % magnitude pruning on digits leaves units without weights; the pruned file
    holds the smaller layers and the manifest says how many went."""
    root = tmp_path / "proj"
    extra = ["prune.sparsity=0.99", "prune.finetune.epochs=1"]
    p = load_params(REPO / "params.yaml", [*FAST, *extra], root=root)
    for stage in ("data", "train_teacher", "prune"):
        out = run_stage(stage, p, root)
    assert out.dead_units and sum(out.dead_units.values()) > 0
    model, header = load_model(StagePaths(root).model("prune"))
    assert header.transforms[-1]["kind"] == "structured"
    assert model.net[1].weight.shape[0] == 128 - out.dead_units.get("net.1", 0)
    off = load_params(REPO / "params.yaml", [*FAST, *extra, "prune.dead_units=false"], root=root)
    shutil.rmtree(root / "models" / "prune")
    out_off = run_stage("prune", off, root)
    assert out_off.dead_units is None
    assert load_model(StagePaths(root).model("prune"))[0].net[1].weight.shape[0] == 128


@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_a_transformer_magnitude_pruned_hard_keeps_its_predictions(sparsity, tmp_path):
    """A ViT's Linears see [batch, tokens, features] and its fused qkv is split into heads: dead-unit removal
    must read the feature dimension and keep qkv's width, and the file must load to the same outputs."""
    from shrinkflow.masks import prunable

    h = _header({"arch": "transformer", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp": 64})
    torch.manual_seed(0)
    model = h.build().eval()
    with torch.no_grad():
        for _, w in prunable(model).items():  # per-layer magnitude pruning, hard
            k = int(sparsity * w.numel())
            w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    before = model(X)
    out, header, removed = remove_dead_units(copy.deepcopy(model), h, probe=X)
    _close(out(X), before)
    save_model(out, tmp_path / "vit.pt", header)
    loaded, _ = load_model(tmp_path / "vit.pt")
    _close(loaded(X), before)
    assert removed and all("qkv" not in name for name in removed)  # MLP units went, qkv kept its width
