"""Quantization methods: fidelity (SQNR), size on disk, accuracy, low-bit QAT, kmeans codebooks, pruned zeros.

Every model is measured as loaded back from its file. Data: sklearn digits.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from schemas.common import Finetune, Optimizer
from schemas.data import DigitsData
from schemas.prune import MagnitudePrune
from schemas.quantize import DynamicQuant, KMeansQuant, QATQuant, StaticQuant
from shrinkflow.artifacts import ModelHeader, from_float, keep_constraints, save_model, to_float
from shrinkflow.config import load_params
from shrinkflow.data import prepare
from shrinkflow.errors import ParamsError
from shrinkflow.loading import load_model
from shrinkflow.masks import prunable
from shrinkflow.methods import Env
from shrinkflow.pruning.magnitude import magnitude_prune
from shrinkflow.quantization import QUANTIZERS, codebooks
from shrinkflow.training import fit, predict, quality

REPO = Path(__file__).resolve().parents[1]
OPT = Optimizer(name="sgd", lr=0.05, momentum=0.9)
#: This file's own model classes (ConvBNNet): trusted when a header names them.
ALLOW = ["test_quantization"]


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return prepare(DigitsData(), seed=0)


def _header(spec: dict, splits, masked: bool = False) -> ModelHeader:
    return ModelHeader(spec=spec, input_shape=splits.input_shape, out_features=splits.out_features,
                       task=splits.task, masked=masked)


def _train(spec: dict, splits, epochs: int = 10) -> tuple[torch.nn.Module, ModelHeader]:
    torch.manual_seed(0)
    header = _header(spec, splits)
    model = header.build(allow=ALLOW)
    fit(model, splits, epochs=epochs, batch_size=64, optimizer=OPT, seed=0, device=torch.device("cpu"), where="test")
    return model, header


@pytest.fixture(scope="module")
def mlp(digits):
    return _train({"arch": "mlp", "hidden": [128, 64]}, digits)


@pytest.fixture(scope="module")
def pruned_mlp(mlp, digits):
    model, header = copy.deepcopy(mlp[0]), mlp[1]
    magnitude_prune(model, MagnitudePrune(scope="global", sparsity=0.8))
    return model, header.model_copy(update={"masked": True})


def _quantize(model, header, params, splits, tmp_path: Path, name: str):
    """Quantize, save, and load back: the model as a user gets it."""
    qmodel, qheader = QUANTIZERS[params.method](model, header, params, Env(splits=splits, seed=0))
    assert qheader.transforms[-1]["kind"] == params.method  # the transform is named after the method
    path = tmp_path / f"{name}.pt"
    size = save_model(qmodel, path, qheader)
    loaded, h = load_model(path, ALLOW)
    return loaded, h, size


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of the outputs, in dB."""
    noise = F.mse_loss(approx, reference, reduction="sum").item()
    return 10 * math.log10(reference.pow(2).sum().item() / max(noise, 1e-20))


FT = Finetune(epochs=1, batch_size=64, optimizer=Optimizer(lr=0.01))

#: method params → (min SQNR in dB of the test logits against the float model's,
#: max accuracy drop on the test split in pp). Seen when written (seed 0): dynamic 42,
#: static 36 (all observers), kmeans 4-bit 22, 8-bit 52 dB; drops ≤ 0.6 pp. QAT's
#: SQNR (18 dB) is lower by design: its fine-tuning changes the function too.
METHODS = {
    "dynamic": (DynamicQuant(), 32.0, 1.0),
    "static": (StaticQuant(), 28.0, 1.5),
    "static-minmax-per-tensor": (StaticQuant(observer="minmax", per_channel=False), 28.0, 1.5),
    "static-percentile": (StaticQuant(observer="percentile"), 28.0, 1.5),
    "qat": (QATQuant(finetune=FT), 12.0, 2.0),
    "kmeans-4bit": (KMeansQuant(bits=4, finetune=Finetune(epochs=0)), 17.0, 2.0),
    "kmeans-8bit": (KMeansQuant(bits=8, finetune=Finetune(epochs=0)), 40.0, 1.0),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_fidelity_and_accuracy_per_method(name, mlp, digits, tmp_path):
    params, min_sqnr, max_drop_pp = METHODS[name]
    model, header = mlp
    X, y = digits.tensors("test")
    ref = predict(model, X)
    qmodel, _, _ = _quantize(model, header, params, digits, tmp_path, name)
    out = predict(qmodel, X)
    assert sqnr_db(ref, out) > min_sqnr
    drop_pp = 100 * (quality(ref, y, "classification") - quality(out, y, "classification"))
    assert drop_pp <= max_drop_pp


def test_int8_file_is_about_a_quarter_of_fp32(digits, tmp_path):
    header = _header({"arch": "mlp", "hidden": [256, 128]}, digits)
    torch.manual_seed(0)
    model = header.build().eval()
    fp32 = save_model(model, tmp_path / "fp32.pt", header)
    for params in (StaticQuant(calibration_batches=2), DynamicQuant(), KMeansQuant(bits=8, finetune=Finetune(epochs=0))):
        _, _, size = _quantize(model, header, params, digits, tmp_path, params.method)
        # 1 byte per weight instead of 4, plus bounded overhead (scales, biases, file records).
        assert fp32 / 4 <= size <= fp32 / 4 + 16_000, (params.method, size, fp32)
    _, _, size4 = _quantize(model, header, KMeansQuant(bits=4, finetune=Finetune(epochs=0)), digits, tmp_path, "k4")
    assert size4 <= fp32 / 4 + 16_000


def test_qat_beats_static_ptq_at_low_bits(mlp, digits, tmp_path):
    model, header = mlp
    X, y = digits.tensors("test")
    common = dict(bits=2, per_channel=False)
    ptq, _, _ = _quantize(model, header, StaticQuant(**common), digits, tmp_path, "ptq")
    qat, _, _ = _quantize(model, header, QATQuant(**common, finetune=Finetune(epochs=3, optimizer=Optimizer(lr=0.01))),
                          digits, tmp_path, "qat")
    acc_ptq = quality(predict(ptq, X), y, "classification")
    acc_qat = quality(predict(qat, X), y, "classification")
    # Seen when written: QAT 93.9 % vs PTQ 74.1 %.
    assert acc_qat > acc_ptq + 0.05, (acc_qat, acc_ptq)


def _distinct_weights(model) -> dict[str, int]:
    return {name: len(torch.unique(cb[idx.long()])) for name, (cb, idx) in codebooks(model).items()}


def test_kmeans_layers_hold_at_most_2_pow_bits_values(mlp, digits, tmp_path):
    model, header = mlp
    params = KMeansQuant(bits=3, layer_bits={"net.5": 2, "net.3": 5}, finetune=FT)
    qmodel, _, _ = _quantize(model, header, params, digits, tmp_path, "k")
    distinct = _distinct_weights(qmodel)
    assert set(distinct) == {"net.1", "net.3", "net.5"}
    assert distinct["net.1"] <= 8 and distinct["net.3"] <= 32 and distinct["net.5"] <= 4
    assert distinct["net.1"] > 4  # k-means really used the codes it had
    bits = {"net.1": 3, "net.3": 5, "net.5": 2}
    for name, (cb, idx) in codebooks(qmodel).items():
        assert idx.dtype == torch.uint8 and cb.dtype == torch.float32 and len(cb) == 2 ** bits[name]


def test_kmeans_layer_bits_null_keeps_float_and_bad_pattern_is_named(mlp, digits, tmp_path):
    model, header = mlp
    qmodel, _, _ = _quantize(model, header, KMeansQuant(bits=4, layer_bits={"net.5": None}, finetune=Finetune(epochs=0)),
                             digits, tmp_path, "k")
    assert set(codebooks(qmodel)) == {"net.1", "net.3"}
    with pytest.raises(ParamsError, match="quantize.layer_bits"):
        QUANTIZERS["kmeans"](model, header, KMeansQuant(layer_bits={"conv*": 4}), Env(splits=digits))


def test_kmeans_centroid_finetuning_recovers_accuracy(mlp, digits, tmp_path):
    model, header = mlp
    X, y = digits.tensors("val")
    plain, _, _ = _quantize(model, header, KMeansQuant(bits=2, finetune=Finetune(epochs=0)), digits, tmp_path, "a")
    tuned, _, _ = _quantize(model, header, KMeansQuant(bits=2, finetune=FT), digits, tmp_path, "b")
    assert quality(predict(tuned, X), y, "classification") >= quality(predict(plain, X), y, "classification")
    assert max(_distinct_weights(tuned).values()) <= 4


@pytest.mark.parametrize("params", [DynamicQuant(), StaticQuant(), QATQuant(finetune=FT), KMeansQuant(bits=3, finetune=FT)],
                         ids=["dynamic", "static", "qat", "kmeans"])
def test_pruned_zeros_survive_quantization(params, pruned_mlp, digits, tmp_path):
    model, header = pruned_mlp
    before = {k: w == 0 for k, w in prunable(model).items()}
    qmodel, h, _ = _quantize(model, header, params, digits, tmp_path, params.method)
    after = prunable(to_float(qmodel, h))
    for k, zero in before.items():
        assert zero.float().mean() > 0.3
        assert bool((after[k][zero] == 0).all()), k


@pytest.mark.parametrize("params", [DynamicQuant(), StaticQuant(bits=4), QATQuant(bits=4, finetune=FT), KMeansQuant(bits=3, finetune=FT)],
                         ids=["dynamic", "static", "qat", "kmeans"])
def test_recovery_training_keeps_the_quantization(params, pruned_mlp, digits, tmp_path):
    """What distill does: to_float → train with keep_constraints → from_float; zeros and codes survive."""
    model, header = pruned_mlp
    qmodel, h, _ = _quantize(model, header, params, digits, tmp_path, "q")
    X, _ = digits.tensors("val")
    # Without training the round trip is exact.
    same = from_float(to_float(qmodel, h), h)
    assert torch.equal(predict(same, X), predict(qmodel, X))
    student = to_float(qmodel, h)
    fit(student, digits, epochs=1, batch_size=64, optimizer=Optimizer(lr=0.01), seed=0, device=torch.device("cpu"),
        where="test", after_step=keep_constraints(student, h))
    path = tmp_path / "recovered.pt"
    save_model(from_float(student, h), path, h)
    recovered, h2 = load_model(path)
    zeros = {k: w == 0 for k, w in prunable(model).items()}
    for k, w in prunable(to_float(recovered, h2)).items():
        assert bool((w[zeros[k]] == 0).all()), k
    if params.method == "kmeans":
        assert max(_distinct_weights(recovered).values()) <= 2**params.bits
    else:  # int8 weights within the bits range
        weights = (recovered.quantized_weights().values() if hasattr(recovered, "quantized_weights") else
                   [m.weight() for m in recovered.modules() if callable(getattr(m, "weight", None))])
        ints = [w.int_repr() for w in weights if w.is_quantized]
        assert ints
        for i in ints:
            assert i.min() >= -(2 ** (params.bits - 1)) and i.max() <= 2 ** (params.bits - 1) - 1


@pytest.mark.parametrize("constrained", [True, False])
def test_dynamic_recovery_trains_on_the_int8_grid(constrained, pruned_mlp, digits, tmp_path):
    """With the dynamic transform's constraint, the trained weights are the int8 weights that get saved."""
    model, header = pruned_mlp
    qmodel, h, _ = _quantize(model, header, DynamicQuant(), digits, tmp_path, "q")
    student = to_float(qmodel, h)
    before = {k: w.clone() for k, w in prunable(student).items()}
    hook = keep_constraints(student, h) if constrained else None
    fit(student, digits, epochs=2, batch_size=64, optimizer=Optimizer(lr=0.01), seed=0, device=torch.device("cpu"),
        where="test", after_step=hook)
    trained = prunable(student)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    saved = dict(from_float(student, h).named_modules())
    on_grid = []
    for k, w in trained.items():
        q = saved[k.rsplit(".", 1)[0]].weight()
        w = w.detach()
        on_grid.append(float((q.dequantize() - w).abs().le(1e-3 * q.q_scale()).float().mean()))
        assert float((q.dequantize() - w).abs().max()) <= q.q_scale() * 1.01  # one step at most, always
    if constrained:  # requantizing leaves every trained weight as it was
        assert min(on_grid) == 1.0, on_grid
    else:  # the unconstrained float weights are rounded afterwards: most change
        assert max(on_grid) < 0.5, on_grid


def test_lenet_static_is_an_int8_graph_that_reloads_identically(digits, tmp_path):
    from shrinkflow.quantization.static import QuantizedGraph

    model, header = _train({"arch": "lenet5"}, digits, epochs=2)
    qmodel, qheader = QUANTIZERS["static"](model, header, StaticQuant(calibration_batches=3), Env(splits=digits))
    path = tmp_path / "lenet.pt"
    save_model(qmodel, path, qheader)
    loaded, _ = load_model(path)
    X, _ = digits.tensors("test")
    assert torch.equal(predict(loaded, X), predict(qmodel, X))
    assert isinstance(loaded, QuantizedGraph) and qheader.transforms[-1]["graph"] == "pt2e"
    state = loaded.state_dict()
    int8 = [k for k, v in state.items() if v.dtype == torch.int8]
    assert len(int8) == 4  # both convolutions and both Linear layers
    assert not any(v.dtype == torch.float32 and v.dim() > 1 for v in state.values())  # no float weight kept beside them
    assert not any("activation_post_process" in n for n, _ in loaded.named_modules())  # converted: no observer left
    # The four int8 weights hold all but the biases and scales: the file is about a quarter of fp32.
    fp32 = save_model(model, tmp_path / "fp32.pt", header)
    assert path.stat().st_size < fp32 / 3.5


def test_params_validation_names_the_key():
    with pytest.raises(ParamsError, match="quantize.bits"):
        load_params(REPO / "params.yaml", ["quantize={method: kmeans, bits: 1}"], root=REPO)
    with pytest.raises(ParamsError, match="finetune.epochs"):
        load_params(REPO / "params.yaml", ["quantize={method: qat, finetune: {epochs: 0}}"], root=REPO)
    with pytest.raises(ParamsError, match="quantize.layer_bits"):
        load_params(REPO / "params.yaml", ["quantize={method: kmeans, layer_bits: {'net.*': 9}}"], root=REPO)
    with pytest.raises(ParamsError, match="quantize.observer"):
        load_params(REPO / "params.yaml", ["quantize={method: static, observer: mse}"], root=REPO)
    p = load_params(REPO / "params.yaml", ["quantize={method: kmeans, bits: 5, layer_bits: {'net.1': 8}}"], root=REPO)
    assert isinstance(p.quantize, KMeansQuant) and p.quantize.layer_bits == {"net.1": 8}


def test_quantize_stage_writes_a_smaller_variant_with_its_zeros(pruned_mlp, digits, tmp_path):
    """The stage in-process, on a pruned model placed where the prune stage writes it."""
    import shutil

    from schemas.paths import StagePaths
    from shrinkflow.data import save_splits
    from shrinkflow.masks import sparsity
    from tasks.run import run_stage

    root = tmp_path / "proj"
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    paths = StagePaths(root)
    save_splits(digits, paths.splits)
    model, header = pruned_mlp
    pruned_size = save_model(model, paths.model("prune"), header)
    for method, fmt in (("kmeans", "kmeans"), ("static", "static")):
        p = load_params(root / "params.yaml", [f"quantize={{method: {method}, bits: 4}}"], root=root)
        out = run_stage("quantize", p, root)
        assert out.method == method and out.model.format.startswith(fmt)
        assert out.model.size_bytes < pruned_size / 2, method
        assert out.sparsity >= sparsity(model)[0] - 1e-9
        assert out.val_metric is not None and out.val_metric > 0.8


class ConvBNNet(torch.nn.Module):
    """Conv → BatchNorm → ReLU → Linear: what FX fuses and folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def test_static_folds_batchnorm_and_round_trips_through_float(digits, tmp_path):
    model, header = _train({"arch": "module", "import": "test_quantization:ConvBNNet"}, digits, epochs=2)
    X, _ = digits.tensors("test")
    qmodel, h, _ = _quantize(model, header, StaticQuant(calibration_batches=5), digits, tmp_path, "bn")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in qmodel.modules())  # folded
    assert sqnr_db(predict(model, X), predict(qmodel, X)) > 20
    # The float form holds the folded weights with BatchNorm as identity: same function.
    f = to_float(qmodel, h)
    assert sqnr_db(predict(qmodel, X), predict(f, X)) > 20
    assert torch.equal(predict(from_float(f, h), X), predict(qmodel, X))


def test_percentile_observer_clips_outliers():
    from torchao.quantization.pt2e import MinMaxObserver

    from shrinkflow.quantization.static import _percentile_observer

    x = torch.cat([torch.rand(10_000), torch.tensor([50.0])])  # one outlier
    p, m = _percentile_observer()(percentile=99.9, dtype=torch.quint8), MinMaxObserver(dtype=torch.quint8)
    p(x)
    m(x)
    assert p.calculate_qparams()[0] < m.calculate_qparams()[0] / 10


def test_torch_ao_deprecation_warnings_are_filtered_at_our_call_sites(mlp, digits, tmp_path):
    import warnings

    model, header = mlp
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for params in (DynamicQuant(), StaticQuant(calibration_batches=2), QATQuant(finetune=FT)):
            _quantize(model, header, params, digits, tmp_path, params.method)
    ours = [w for w in seen if "torch.ao.quantization is deprecated" in str(w.message) or "observer" in str(w.message)]
    assert not ours, [str(w.message)[:80] for w in ours]


# ------------------------------------------------------------------ bits: auto


@pytest.fixture(scope="module")
def ternary_features(digits):
    """An MLP whose first layer holds three values (random ±0.3 and 0: insensitive to clustering at ≥ 2 bits)
    and whose trained readout is continuous (sensitive): we know which layer is which."""
    torch.manual_seed(0)
    header = _header({"arch": "mlp", "hidden": [64]}, digits)
    model = header.build()
    with torch.no_grad():
        first = model.net[1]
        first.weight.copy_(0.3 * torch.randint(-1, 2, first.weight.shape).float())
    first.weight.requires_grad_(False)
    first.bias.requires_grad_(False)
    fit(model, digits, epochs=15, batch_size=64, optimizer=OPT, seed=0, device=torch.device("cpu"), where="test")
    first.weight.requires_grad_(True)
    first.bias.requires_grad_(True)
    return model, header


def test_auto_bits_gives_the_insensitive_layer_fewer_bits(ternary_features, digits, tmp_path):
    model, header = ternary_features
    assert len(torch.unique(model.net[1].weight)) == 3
    params = KMeansQuant(bits="auto", auto_budget=0.005, finetune=Finetune(epochs=0))
    env = Env(splits=digits, seed=0)
    qmodel, qheader = QUANTIZERS["kmeans"](model, header, params, env)
    bits = qheader.transforms[-1]["layers"]
    table = env.notes["bit_sensitivity"]
    # Measured when written (seed 0, validation accuracy 89.5 %): net.1 loses nothing at any width; net.3 loses
    # 8.4 pp at 2 bits, 0.7 pp at 3, nothing from 4 on; chosen: net.1 2 bits, net.3 4.
    assert all(v == 0 for v in table["loss"]["net.1"].values())
    assert table["loss"]["net.3"]["2"] > 0.04
    assert bits["net.1"] == 2 and bits["net.3"] > bits["net.1"]
    assert table["joint_loss"] <= params.auto_budget
    # The widths are what the file holds: at most 2**bits distinct values per layer.
    path = tmp_path / "auto.pt"
    save_model(qmodel, path, qheader)
    loaded, h = load_model(path)
    for name, (cb, idx) in codebooks(loaded).items():
        assert len(torch.unique(cb[idx.long()])) <= 2 ** h.transforms[-1]["layers"][name]


def test_auto_bits_budget_trades_bits_for_accuracy(mlp, digits):
    """A larger budget never costs more bits; a zero budget keeps every layer at the widest choice that loses nothing."""
    model, header = mlp
    chosen = {}
    for budget in (0.0, 0.02, 0.1):
        env = Env(splits=digits, seed=0)
        params = KMeansQuant(bits="auto", auto_bits=[2, 4, 6, 8], auto_budget=budget, finetune=Finetune(epochs=0))
        _, qheader = QUANTIZERS["kmeans"](model, header, params, env)
        chosen[budget] = qheader.transforms[-1]["layers"]
        assert env.notes["bit_sensitivity"]["joint_loss"] <= budget
    total = {b: sum(layers.values()) for b, layers in chosen.items()}
    assert total[0.1] <= total[0.02] <= total[0.0]
    assert total[0.1] < total[0.0]


def test_auto_bits_keeps_explicit_layer_bits(mlp, digits):
    model, header = mlp
    params = KMeansQuant(bits="auto", layer_bits={"net.5": 8}, auto_budget=0.01, finetune=Finetune(epochs=0))
    _, qheader = QUANTIZERS["kmeans"](model, header, params, Env(splits=digits, seed=0))
    layers = qheader.transforms[-1]["layers"]
    assert layers["net.5"] == 8 and set(layers) == {"net.1", "net.3", "net.5"}


def test_files_of_the_fx_static_path_still_load_and_pack(mlp, digits, tmp_path):
    """A static file as shrinkflow 0.1 wrote it (FX graph mode, no "graph" in its entry) loads, packs and reloads."""
    from shrinkflow.quantization import static, static_fx

    model, header = mlp
    X, _ = digits.tensors("train")
    with static_fx.quiet_torch_ao():
        prepared = static_fx.prepare(copy.deepcopy(model), (X[:2],), static_fx.qconfig(observer="histogram"))
        static.calibrate(X, 3, 64)(prepared)
        qmodel = static_fx.convert(prepared)
    entry = {"bits": 8, "per_channel": True, "activations": static_fx.activation_qparams(qmodel)}
    h = header.with_transform("static-int8", **entry)  # 0.1's transform name
    path = tmp_path / "fx.pt"
    save_model(qmodel, path, h)
    loaded, lh = load_model(path)
    Xt, _ = digits.tensors("test")
    assert lh.transforms[-1]["kind"] == "static" and "graph" not in lh.transforms[-1]
    assert torch.equal(predict(loaded, Xt), predict(qmodel, Xt))
    from shrinkflow.loading import pack_file

    pack_file(path, tmp_path / "fx.sfz")
    packed, _ = load_model(tmp_path / "fx.sfz")
    assert torch.equal(predict(packed, Xt), predict(qmodel, Xt))
