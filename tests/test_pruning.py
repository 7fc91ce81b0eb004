"""Pruning building blocks: targets, patterns, the sparse file format, structured rebuilds, schedules."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import REPO
from torch import nn

from schemas.prune import MagnitudePrune, StructuredPrune
from shrinkflow.artifacts import ModelHeader, read_model_file, save_model
from shrinkflow.errors import ParamsError
from shrinkflow.loading import load_model
from shrinkflow.masks import keep_masked, prunable, sparsity
from shrinkflow.measure import macs
from shrinkflow.pruning import storage as sparse_storage
from shrinkflow.pruning.magnitude import MASKERS
from shrinkflow.pruning.schedule import iterative_targets, zhu_gupta
from shrinkflow.pruning.structured import StructuredPruner
from shrinkflow.sensitivity import auto_allocate

MLP = ModelHeader(spec={"arch": "mlp", "hidden": [64, 32]}, input_shape=[1, 8, 8], out_features=10, task="classification")
LENET = ModelHeader(spec={"arch": "lenet5"}, input_shape=[1, 8, 8], out_features=10, task="classification")
RESNET = ModelHeader(
    spec={"arch": "module", "import": "tests.toy_models:ResNetTiny", "kwargs": {"width": 8}},
    input_shape=[1, 8, 8], out_features=10, task="classification",
)


#: tests.toy_models is this test suite's own code: trusted when a header names one of its classes.
ALLOW = ["tests.toy_models"]


def unstructured(sparsity=0.8, scope="global", layers=None, skip=None):
    return MagnitudePrune(sparsity=sparsity, scope=scope, layers=layers or {}, skip=skip or [])


def structured(sparsity=0.5, scope="layer", layers=None, skip=None):
    return StructuredPrune(method="structured", sparsity=sparsity, scope=scope, layers=layers or {}, skip=skip or [])


@pytest.fixture
def repo_on_path(monkeypatch):
    # `arch: module` imports tests.toy_models from the project root.
    monkeypatch.syspath_prepend(str(REPO))


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.97])
def test_global_and_layer_targets_are_met(method, target):
    torch.manual_seed(0)
    model = MLP.build()
    MASKERS[method](model, unstructured(target, "global"))
    assert sparsity(model)[0] == pytest.approx(target, abs=0.005)
    model = MLP.build()
    MASKERS[method](model, unstructured(target, "layer"))
    for name, s in sparsity(model)[1].items():
        assert s == pytest.approx(target, abs=0.005), name


def test_layer_overrides_and_skip_by_pattern():
    torch.manual_seed(0)
    model = MLP.build()
    masks = MASKERS["magnitude"](model, unstructured(0.9, "global", layers={"net.5": 0.5}, skip=["net.1"]))
    per = sparsity(model)[1]
    assert per["net.1.weight"] == 0.0
    assert per["net.5.weight"] == pytest.approx(0.5, abs=0.005)
    assert per["net.3.weight"] == pytest.approx(0.9, abs=0.005)  # the pool is net.3 alone here
    assert set(masks) == set(prunable(model))
    # Shell-style patterns; the last matching one wins.
    model = MLP.build()
    MASKERS["magnitude"](model, unstructured(0.9, "layer", layers={"net.*": 0.3, "net.3": 0.6}))
    per = sparsity(model)[1]
    assert per["net.1.weight"] == pytest.approx(0.3, abs=0.005)
    assert per["net.3.weight"] == pytest.approx(0.6, abs=0.005)


def test_pattern_matching_nothing_names_the_field_and_the_layers():
    with pytest.raises(ParamsError, match=r"prune\.layers.*'fc3'.*net\.1, net\.3, net\.5"):
        MASKERS["magnitude"](MLP.build(), unstructured(layers={"fc3": 0.5}))
    with pytest.raises(ParamsError, match=r"prune\.skip"):
        MASKERS["random"](MLP.build(), unstructured(skip=["conv*"]))


def test_masks_only_grow_when_pruning_again():
    torch.manual_seed(0)
    model = MLP.build()
    first = MASKERS["magnitude"](model, unstructured(0.8), amount=0.5)
    second = MASKERS["magnitude"](model, unstructured(0.8), amount=1.0)
    for k in first:
        assert not (second[k] & ~first[k]).any(), k  # nothing pruned comes back
    assert sparsity(model)[0] == pytest.approx(0.8, abs=0.005)


def test_keep_masked_restores_zeros_after_an_optimizer_step():
    torch.manual_seed(0)
    model = MLP.build()
    masks = MASKERS["magnitude"](model, unstructured(0.7))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.randn(16, 1, 8, 8)).sum().backward()
    opt.step()
    assert sparsity(model)[0] < 0.7  # the step moved pruned weights...
    keep_masked(masks)(model)
    assert sparsity(model)[0] == pytest.approx(0.7, abs=0.005)  # ...and the hook put them back


def test_sparse_file_is_smaller_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = MLP.build().eval()
    dense = save_model(model, tmp_path / "dense.pt", MLP)
    assert save_model(model, tmp_path / "unpruned.pt", MLP.model_copy(update={"storage": "sparse"})) <= dense + 2000
    MASKERS["magnitude"](model, unstructured(0.9))
    header = MLP.model_copy(update={"storage": "sparse", "masked": True})
    size = save_model(model, tmp_path / "sparse.pt", header)
    assert size < 0.3 * dense
    loaded, h = load_model(tmp_path / "sparse.pt")
    x = torch.randn(32, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert h.storage == "sparse"


def test_sparse_storage_handles_quantized_weights(tmp_path):
    torch.manual_seed(0)
    model = MLP.build().eval()
    MASKERS["magnitude"](model, unstructured(0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    header = MLP.with_transform("dynamic").model_copy(update={"masked": True})
    dense = save_model(qmodel, tmp_path / "q_dense.pt", header)
    size = save_model(qmodel, tmp_path / "q_sparse.pt", header.model_copy(update={"storage": "sparse"}))
    assert size < 0.75 * dense  # int8 weights: 1 bit of mask + 1 byte per kept weight; file overhead is fixed
    loaded, _ = load_model(tmp_path / "q_sparse.pt")
    x = torch.randn(32, 1, 8, 8)
    assert torch.equal(loaded(x), qmodel(x))
    # Module versions (_metadata) survive: quantized modules read them when loading.
    _, state = read_model_file(tmp_path / "q_sparse.pt")
    assert state._metadata == qmodel.state_dict()._metadata

    # Per-channel int8 with nonzero zero points round-trips bit for bit.
    w = torch.randn(64, 48)
    w[w.abs() < 1.2] = 0
    q = torch.quantize_per_channel(w, torch.rand(64) + 0.1, torch.randint(-3, 3, (64,)), 0, torch.qint8)
    enc = sparse_storage.encode({"w": q, "small": torch.zeros(3), "dtype": torch.qint8})
    assert enc["entries"]["w"]["t"] == "qbitmask" and enc["entries"]["small"]["t"] == "raw"
    out = sparse_storage.decode(enc)["w"]
    assert torch.equal(out.int_repr(), q.int_repr()) and torch.equal(out.q_per_channel_scales(), q.q_per_channel_scales())


@pytest.mark.parametrize("header", [MLP, LENET, RESNET], ids=["mlp", "lenet5", "resnet-bn-residual"])
def test_structured_shrinks_params_and_macs_and_reloads_from_file(header, tmp_path, repo_on_path):
    torch.manual_seed(0)
    model = header.build(allow=ALLOW).eval()
    for m in model.modules():  # BatchNorm with non-trivial statistics, so a wrong reload shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    before_params = sum(p.numel() for p in model.parameters())
    before_macs = macs(model, header)
    pruner = StructuredPruner(model, structured(0.5), header.input_shape, steps=2)
    pruner.step()
    pruner.step()
    model.eval()
    after = header.with_transform(**pruner.entry()).model_copy(update={"storage": "sparse"})
    x = torch.randn(8, *header.input_shape)
    assert model(x).shape == (8, 10)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before_params
    assert macs(model, after) < 0.6 * before_macs
    save_model(model, tmp_path / "s.pt", after)
    loaded, _ = load_model(tmp_path / "s.pt", ALLOW)
    assert torch.equal(loaded(x), model(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]


def test_structured_per_layer_override_and_skip():
    model = MLP.build()
    pruner = StructuredPruner(model, structured(0.5, layers={"net.3": 0.25}, skip=["net.1"]), MLP.input_shape)
    pruner.step()
    assert model.net[1].out_features == 64  # skipped
    assert model.net[3].out_features == 24  # 25 % of 32 removed
    assert model.net[5].out_features == 10  # the output layer keeps its size


def test_schedules_end_at_the_target():
    assert iterative_targets(0.9, 3)[-1] == pytest.approx(0.9)
    ts = iterative_targets(0.9, 3)
    assert all(a < b for a, b in zip(ts, ts[1:], strict=False))
    ramp = [zhu_gupta(t, 100, 0.1, 0.8) for t in range(0, 121)]
    assert ramp[0] == pytest.approx(0.1) and ramp[100] == pytest.approx(0.8) and ramp[120] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(ramp, ramp[1:], strict=False))
    assert ramp[50] > 0.1 + 0.5 * 0.7  # cubic: most pruning happens early


def test_auto_allocation_meets_the_target_and_spares_sensitive_layers():
    table = {
        "metric": "accuracy",
        "baseline": 0.9,
        "layers": {
            "robust": {"params": 1000, "quality": {"0.5": 0.9, "0.9": 0.89, "0.95": 0.85}},
            "fragile": {"params": 1000, "quality": {"0.5": 0.8, "0.9": 0.3, "0.95": 0.1}},
        },
    }
    alloc = auto_allocate(table, 0.7)
    assert (alloc["robust"] + alloc["fragile"]) / 2 == pytest.approx(0.7, abs=0.005)
    assert alloc["robust"] > alloc["fragile"]


def test_schema_rejects_unsupported_combinations():
    from shrinkflow.config import load_params

    with pytest.raises(ParamsError, match="initial_sparsity"):
        load_params(REPO / "params.yaml", ["prune.method=structured", "prune.schedule=gradual", "prune.initial_sparsity=0.95"])
    with pytest.raises(ParamsError, match="finetune.epochs"):
        load_params(REPO / "params.yaml", ["prune.schedule=gradual", "prune.finetune.epochs=0"])
    with pytest.raises(ParamsError, match="layers"):
        load_params(REPO / "params.yaml", ['prune.layers={"net.1": 1.5}'])
    with pytest.raises(ParamsError, match="sensitivity_sparsities"):
        load_params(REPO / "params.yaml", ["prune.allocation=auto", "prune.sparsity=0.97"])


def test_structured_gradual_shrinks_layers_along_the_cubic_ramp_once_per_epoch(tmp_path, repo_on_path):
    from schemas.prune import StructuredPrune
    from shrinkflow.pruning.schedule import structured_schedule

    torch.manual_seed(0)
    model = MLP.build()
    p = StructuredPrune.model_validate(
        {"method": "structured", "sparsity": 0.75, "schedule": "gradual", "ramp_fraction": 0.6, "finetune": {"epochs": 5}}
    )
    calls: list[tuple[int, int]] = []  # (epochs, width of the first hidden layer) per fine-tuning call

    def finetune(m, epochs, after_step):
        assert after_step is None  # nothing to keep: the removed neurons are gone
        calls.append((epochs, m.net[1].out_features))

    entry = structured_schedule(model, p, MLP.input_shape, finetune)
    # ceil(0.6 · 5) = 3 ramp epochs, each after a step; then 2 epochs at the final width.
    assert [e for e, _ in calls] == [1, 1, 1, 2]
    widths = [w for _, w in calls]
    ramp = [zhu_gupta(t, 3, 0.0, 0.75) for t in (1, 2, 3)]
    assert all(abs(w - 64 * (1 - s)) <= 1 for w, s in zip(widths, ramp, strict=False)), (widths, ramp)  # channel rounding
    assert widths[3] == widths[2] == 16
    assert widths[0] - widths[1] > widths[1] - widths[2] > 0  # cubic: most is removed early
    header = MLP.with_transform(**entry).model_copy(update={"storage": "sparse"})
    save_model(model, tmp_path / "g.pt", header)
    loaded, _ = load_model(tmp_path / "g.pt")
    x = torch.randn(4, *MLP.input_shape)
    assert torch.equal(loaded(x), model.eval()(x))


def test_gradual_schedule_follows_the_cubic_ramp():
    from schemas.prune import MagnitudePrune
    from shrinkflow.pruning.schedule import unstructured_schedule

    torch.manual_seed(0)
    model = MLP.build()
    p = MagnitudePrune.model_validate(
        {"sparsity": 0.9, "schedule": "gradual", "initial_sparsity": 0.3, "ramp_fraction": 0.5, "prune_every": 5,
         "finetune": {"epochs": 2}}
    )
    seen: list[float] = []

    def finetune(m, epochs, after_step):  # stands in for fit: one "step" per call of the hook
        seen.append(sparsity(m)[0])
        for _ in range(epochs * 50):
            with torch.no_grad():
                for w in prunable(m).values():
                    w.add_(0.01)  # an optimizer step that would revive pruned weights
            after_step(m)
            seen.append(sparsity(m)[0])

    unstructured_schedule(model, p, finetune, steps_per_epoch=50)
    assert seen[0] == pytest.approx(0.3, abs=0.005)
    assert seen[25] == pytest.approx(zhu_gupta(25, 50, 0.3, 0.9), abs=0.005)
    assert all(s == pytest.approx(0.9, abs=0.005) for s in seen[50:])  # ramp done at half the steps
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:], strict=False))
