"""Distillation: the losses by hand, students that beat scratch, recovery that keeps compression."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from schemas.common import Optimizer
from schemas.distill import HintDistill, LogitsDistill, RegressionDistill
from schemas.paths import StagePaths
from shrinkflow import distillation, training
from shrinkflow.artifacts import ModelHeader, to_float
from shrinkflow.config import load_params
from shrinkflow.data import Splits, load_splits
from shrinkflow.distillation import PLANS, train_student
from shrinkflow.errors import ParamsError
from shrinkflow.loading import load_model
from shrinkflow.losses import logits_loss, regression_loss, soft_kl
from shrinkflow.masks import prunable
from shrinkflow.methods import Env
from shrinkflow.training import fit, predict, quality, save_teacher_outputs, seed_everything, teacher_outputs
from tasks.run import run_stage

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- losses by hand


def _softmax(v: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


Z = [1.0, 2.0, 0.5]  # student logits
V = [2.0, 0.5, -1.0]  # teacher logits


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_logits_loss_matches_hand_computation(T):
    alpha, label = 0.7, 1
    pt, ps = _softmax(V, T), _softmax(Z, T)
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps, strict=True))
    ce = -math.log(_softmax(Z)[label])
    want = alpha * T**2 * kl + (1 - alpha) * ce
    got = logits_loss(T, alpha)(torch.tensor([Z]), torch.tensor([label]), torch.tensor([V]))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Without labels the loss is the soft term alone, whatever the labels say.
    soft = logits_loss(T, alpha, use_labels=False)
    assert soft(torch.tensor([Z]), torch.tensor([0]), torch.tensor([V])).item() == pytest.approx(T**2 * kl, rel=1e-5)
    assert soft(torch.tensor([Z]), torch.tensor([2]), torch.tensor([V])).item() == pytest.approx(T**2 * kl, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_soft_gradient_is_scaled_by_T_squared(T):
    z = torch.tensor([Z], requires_grad=True)
    soft_kl(z, torch.tensor([V]), T).backward()
    # d/dz [T²·KL(p_T(v) ‖ p_T(z))] = T²·(1/T)·(p_T(z) − p_T(v)) = T·(p_s − p_t)
    want = [T * (s - t) for s, t in zip(_softmax(Z, T), _softmax(V, T), strict=True)]
    assert z.grad[0].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_soft_gradient_magnitude_does_not_vanish_with_T():
    # Hinton §2.1: with zero-mean logits the scaled gradient tends to (z − v)/N as T grows,
    # instead of shrinking like 1/T² as the unscaled KL's would.
    z0 = torch.tensor([Z]) - torch.tensor(Z).mean()
    v0 = torch.tensor([V]) - torch.tensor(V).mean()
    z = z0.clone().requires_grad_(True)
    soft_kl(z, v0, 200.0).backward()
    assert z.grad[0].tolist() == pytest.approx(((z0 - v0) / 3)[0].tolist(), rel=1e-2, abs=1e-4)


def test_regression_loss_matches_hand_computation():
    s, y, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [2.0]]), torch.tensor([[2.0], [3.5]])
    want = 0.25 * ((1 + 0.25) / 2) + 0.75 * ((1 + 1) / 2)
    assert regression_loss(0.25)(s, y, t).item() == pytest.approx(want)
    assert regression_loss(0.25, use_labels=False)(s, y * 9, t).item() == pytest.approx(0.625)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Splits:
    from schemas.params import DigitsData
    from shrinkflow.data import prepare

    return prepare(DigitsData(), 0)


def _build(splits: Splits, hidden: list[int], seed: int) -> torch.nn.Module:
    seed_everything(seed)
    header = ModelHeader(
        spec={"arch": "mlp", "hidden": hidden}, input_shape=splits.input_shape,
        out_features=splits.out_features, task=splits.task,
    )
    return header.build()


@pytest.fixture(scope="module")
def teacher(digits) -> torch.nn.Module:
    torch.set_num_threads(1)
    model = _build(digits, [128, 64], 0)
    fit(model, digits, epochs=30, batch_size=64, optimizer=Optimizer(lr=0.05), seed=0, device=CPU, where="teacher")
    return model


def _accuracy(model: torch.nn.Module, splits: Splits) -> float:
    X, y = splits.tensors("test")
    return quality(predict(model, X), y, "classification")


def test_distilled_student_beats_scratch_across_seeds(digits, teacher):
    # A tiny student (1/13 of the teacher's parameters) on a 200-example transfer
    # set: the regime where the teacher's soft targets carry the most information.
    sub = dataclasses.replace(digits, X_train=digits.X_train[:200], y_train=digits.y_train[:200])
    budget = dict(epochs=20, batch_size=32, optimizer=Optimizer(lr=0.05))
    scratch, kd = [], []
    for seed in range(3):
        a = _build(sub, [16], seed)
        fit(a, sub, seed=seed, device=CPU, where="scratch", **budget)
        b = _build(sub, [16], seed)
        train_student(b, LogitsDistill(temperature=4.0, alpha=0.9, **budget), Env(splits=sub, seed=seed, teacher=teacher))
        scratch.append(_accuracy(a, digits))
        kd.append(_accuracy(b, digits))
    assert sum(kd) / 3 > sum(scratch) / 3 + 0.02, (scratch, kd)


def test_teacher_outputs_are_read_from_the_cache_only_for_the_same_inputs(digits, teacher, tmp_path, monkeypatch):
    X, _ = digits.tensors("train")
    cache = tmp_path / "outputs.pt"
    stored = save_teacher_outputs(teacher, X, cache)
    assert torch.equal(stored, predict(teacher, X))
    monkeypatch.setattr(training, "predict", lambda *a, **k: pytest.fail("recomputed despite a matching cache"))
    assert torch.equal(teacher_outputs(teacher, X, cache), stored)
    # Other inputs (one value changed), or a damaged file: recomputed, never trusted.
    calls = []
    monkeypatch.setattr(training, "predict", lambda model, inputs: calls.append(inputs) or torch.zeros(len(inputs), 10))
    other = X.clone()
    other[0, 0] += 1
    assert not teacher_outputs(teacher, other, cache).any() and calls[-1] is other
    cache.write_bytes(cache.read_bytes()[:100])
    assert not teacher_outputs(teacher, X, cache).any() and len(calls) == 2


def test_use_labels_false_never_reads_the_labels(digits, teacher):
    sub = dataclasses.replace(digits, X_train=digits.X_train[:256], y_train=digits.y_train[:256])
    shuffled = dataclasses.replace(sub, y_train=sub.y_train[torch.randperm(256).numpy()])
    params = LogitsDistill(use_labels=False, epochs=2, batch_size=32)
    states = []
    for data in (sub, shuffled):
        model = _build(sub, [16], 1)
        train_student(model, params, Env(splits=data, seed=1, teacher=teacher))
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # ...whereas with labels the permuted labels change the result.
    model = _build(sub, [16], 1)
    train_student(model, LogitsDistill(epochs=2, batch_size=32), Env(splits=shuffled, seed=1, teacher=teacher))
    assert not torch.equal(model.state_dict()["net.1.weight"], states[0]["net.1.weight"])


# ----------------------------------------------------------------------------- hint (FitNets)


def _hint(**kw) -> HintDistill:
    return HintDistill(teacher_layer="net.2", student_layer="net.2", batch_size=32, **kw)


def test_hint_trains_a_projection_and_discards_it(digits, teacher):
    sub = dataclasses.replace(digits, X_train=digits.X_train[:256], y_train=digits.y_train[:256])
    student = _build(sub, [16], 0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    X = sub.tensors("train")[0]
    plan = PLANS["hint"](student, teacher, X, predict(teacher, X), sub.task, _hint(hint_epochs=3, weight=1.0))
    assert plan.targets[1].shape == (256, 128)  # teacher's first hidden layer, stored once

    def hint_mse() -> float:
        plan.model.eval()
        with torch.no_grad():
            plan.model(X)
            return float(torch.nn.functional.mse_loss(plan.model.hint, plan.targets[1]))

    start = hint_mse()
    fit(plan.model, sub, epochs=10, batch_size=32, optimizer=Optimizer(lr=0.05), seed=0, device=CPU, where="t",
        loss_fn=plan.pretrain_loss, extra_targets=plan.targets)
    assert hint_mse() < 0.5 * start
    plan.close()
    # FitNets' first stage moves only the student up to the guided layer.
    after = student.state_dict()
    assert not torch.equal(after["net.1.weight"], before["net.1.weight"])
    assert torch.equal(after["net.3.weight"], before["net.3.weight"])

    # Through `distill`, the student comes back alone: same keys, no projection, no hook.
    student = _build(sub, [16], 0)
    train_student(student, _hint(hint_epochs=1, epochs=1), Env(splits=sub, seed=0, teacher=teacher))
    assert student.state_dict().keys() == before.keys()
    assert not student.net[2]._forward_hooks


def test_hint_recomputed_per_batch_equals_stored(digits, teacher, monkeypatch):
    sub = dataclasses.replace(digits, X_train=digits.X_train[:128], y_train=digits.y_train[:128])
    results = []
    for limit in (distillation.MAX_STORED_HINT_BYTES, 0):
        monkeypatch.setattr(distillation, "MAX_STORED_HINT_BYTES", limit)
        student = _build(sub, [16], 0)
        train_student(student, _hint(hint_epochs=1, epochs=1), Env(splits=sub, seed=0, teacher=teacher))
        results.append(student.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k])


def test_hint_changes_training_and_names_bad_layers(digits, teacher):
    sub = dataclasses.replace(digits, X_train=digits.X_train[:128], y_train=digits.y_train[:128])
    a, b = _build(sub, [16], 0), _build(sub, [16], 0)
    train_student(a, LogitsDistill(epochs=1, batch_size=32), Env(splits=sub, seed=0, teacher=teacher))
    train_student(b, _hint(epochs=1, weight=5.0), Env(splits=sub, seed=0, teacher=teacher))
    assert not torch.equal(a.state_dict()["net.1.weight"], b.state_dict()["net.1.weight"])
    with pytest.raises(ParamsError, match=r"distill.teacher_layer 'net.9'.*'net.1'"):
        train_student(_build(sub, [16], 0), HintDistill(teacher_layer="net.9", student_layer="net.2"),
                      Env(splits=sub, seed=0, teacher=teacher))
    with pytest.raises(ParamsError, match="distill.student_layer 'fc1'"):
        train_student(_build(sub, [16], 0), HintDistill(teacher_layer="net.2", student_layer="fc1"),
                      Env(splits=sub, seed=0, teacher=teacher))


def test_hint_projection_between_feature_maps_is_a_1x1_conv():
    proj = distillation._projection(torch.zeros(2, 20, 6, 6), torch.zeros(2, 50, 6, 6))
    assert isinstance(proj, torch.nn.Conv2d) and proj.kernel_size == (1, 1) and proj.out_channels == 50
    proj = distillation._projection(torch.zeros(2, 20, 6, 6), torch.zeros(2, 64))
    assert proj(torch.zeros(2, 20, 6, 6)).shape == (2, 64)


# ----------------------------------------------------------------------------- the stage


def _chain(root: Path, params_file: Path, overrides: list[str], stages: tuple[str, ...]):
    params = load_params(params_file, overrides, root=root)
    return {s: run_stage(s, params, root) for s in stages}


#: Quantize methods and the overrides that keep their own training short.
QUANT_METHODS = {
    "dynamic": [],
    "static": ["quantize.calibration_batches=4"],
    "qat": ["quantize.finetune.epochs=1"],
    "kmeans": ["quantize.bits=4", "quantize.finetune.epochs=1"],
}
RECOVERY = [*FAST, "prune.sparsity=0.8", "distill.epochs=2"]


@pytest.fixture(scope="module")
def pruned_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pruned")
    _chain(root, REPO / "params.yaml", RECOVERY, ("data", "train_teacher", "prune"))
    return root


def _quant_methods() -> list[str]:
    from shrinkflow.quantization import QUANTIZERS

    return [m for m in QUANT_METHODS if m in QUANTIZERS]


@pytest.mark.parametrize("method", _quant_methods())
def test_recovery_keeps_sparsity_and_quantization_exactly(pruned_project, tmp_path, method):
    root = tmp_path / "proj"
    shutil.copytree(pruned_project, root)
    out = _chain(root, REPO / "params.yaml", [*RECOVERY, f"quantize.method={method}", *QUANT_METHODS[method]],
                 ("quantize", "distill"))
    paths = StagePaths(root)
    pruned, _ = load_model(paths.model("prune"))
    quantized, qheader = load_model(paths.model("quantize"))
    student, sheader = load_model(paths.model("distill"))
    # Same compression, as data: the file rebuilds the same architecture and encoding.
    assert sheader == qheader and sheader.transforms and sheader.masked
    assert out["distill"].model.format == out["quantize"].model.format
    assert out["distill"].model.size_bytes == out["quantize"].model.size_bytes
    for (qn, qm), (sn, sm) in zip(quantized.named_modules(), student.named_modules(), strict=True):
        # (FX graph modules get a fresh class per instance: compare by name.)
        assert qn == sn and type(qm).__name__ == type(sm).__name__, (qn, sn)
        if isinstance(qm, DynamicLinear):
            qw, sw = qm.weight(), sm.weight()
            assert sw.dtype == qw.dtype == torch.qint8 and sw.qscheme() == qw.qscheme()
    if method == "kmeans":
        from shrinkflow.quantization.kmeans import codebooks

        books = codebooks(student)
        assert books and all(len(torch.unique(cb[idx.long()])) <= 16 for cb, idx in books.values())
    # Pruned weights stay exactly zero; the kept ones did train.
    masks = {k: w == 0 for k, w in prunable(pruned).items()}
    after, before = prunable(to_float(student, sheader)), prunable(to_float(quantized, qheader))
    for k, zero in masks.items():
        assert zero.any() and torch.all(after[k][zero] == 0), k
    assert any(not torch.equal(after[k], before[k]) for k in masks)
    assert out["distill"].model.nonzero_params <= out["quantize"].model.nonzero_params
    assert out["distill"].method == "logits" and out["distill"].input_val_metric is not None


def test_regression_kd_on_seed_preset_lowers_mse_to_teacher(tmp_path):
    preset = REPO / "examples/seed-regression/params.yaml"
    _chain(tmp_path, preset, ["train_teacher.epochs=15"], ("data", "train_teacher", "prune", "quantize", "distill"))
    paths = StagePaths(tmp_path)
    X, _ = load_splits(paths.splits).tensors("test")
    teacher_out = predict(load_model(paths.model("train_teacher"))[0], X)

    def mse_to_teacher(stage: str) -> float:
        return float(torch.nn.functional.mse_loss(predict(load_model(paths.model(stage))[0], X), teacher_out))

    assert mse_to_teacher("distill") < 0.95 * mse_to_teacher("quantize")
    # train_teacher stored the teacher's outputs on the transfer set for distill to reuse.
    stored = torch.load(paths.teacher_outputs, weights_only=True)["outputs"]
    X_train, _ = load_splits(paths.splits).tensors("train")
    assert torch.equal(stored, predict(load_model(paths.model("train_teacher"))[0], X_train))


def test_new_student_regression_from_teacher_only(tmp_path):
    preset = REPO / "examples/seed-regression/params.yaml"
    out = _chain(
        tmp_path, preset,
        ["train_teacher.epochs=15", "prune.enabled=false", "quantize.enabled=false",
         "distill.student={arch: mlp, hidden: [8]}", "distill.use_labels=false", "distill.alpha=1.0",
         "distill.epochs=20"],
        ("data", "train_teacher", "prune", "quantize", "distill"),
    )
    assert out["distill"].student == "mlp" and out["distill"].model.params == 10 * 8 + 8 + 8 + 1
    assert out["distill"].input_val_metric is None
    # The student learned the teacher's function well enough to fit the labels it never saw.
    splits = load_splits(StagePaths(tmp_path).splits)
    assert out["distill"].val_metric < 0.5 * float(splits.y_val.var())


# ----------------------------------------------------------------------------- params


def test_method_registry_params(tmp_path):
    p = load_params(REPO / "params.yaml", root=REPO)
    assert p.distill.method == "auto" and p.distill.temperature == 4.0
    p = load_params(
        REPO / "params.yaml",
        ["distill.method=hint", "distill.teacher_layer=net.2", "distill.student_layer=net.2", "distill.weight=0.5"],
        root=REPO,
    )
    assert isinstance(p.distill, HintDistill) and p.distill.weight == 0.5
    p = load_params(REPO / "examples/seed-regression/params.yaml", root=REPO)
    assert isinstance(p.distill, RegressionDistill)
    with pytest.raises(ParamsError, match="distill.teacher_layer"):
        load_params(REPO / "params.yaml", ["distill.method=hint"], root=REPO)
    with pytest.raises(ParamsError, match="distill.temperature"):  # regression has no temperature
        load_params(REPO / "examples/seed-regression/params.yaml", ["distill.temperature=2"], root=REPO)
    with pytest.raises(ParamsError, match="distill.method"):
        load_params(REPO / "params.yaml", ["distill.method=attention"], root=REPO)


def test_two_passes_compress_a_new_student(tmp_path):
    """docs/distillation.md: distil a student, then import it as the teacher of a second chain."""
    chain = ("data", "train_teacher", "prune", "quantize", "distill")
    first = _chain(tmp_path, REPO / "examples/student-mlp/params.yaml",
                   ["train_teacher.epochs=8", "distill.epochs=5"], chain)
    assert first["distill"].student == "mlp" and first["distill"].model.format == first["train_teacher"].model.format
    (tmp_path / "students").mkdir()
    shutil.copyfile(StagePaths(tmp_path).model("distill"), tmp_path / "students/mlp32.pt")
    second = _chain(
        tmp_path, REPO / "examples/student-compress/params.yaml",
        ["train_teacher.checkpoint=students/mlp32.pt", "prune.finetune.epochs=1", "distill.epochs=1"], chain[1:],
    )
    assert second["train_teacher"].imported
    assert second["train_teacher"].model.params == first["distill"].model.params
    assert second["train_teacher"].val_metric == pytest.approx(first["distill"].val_metric)
    final = second["distill"].model
    assert final.params == first["distill"].model.params and final.format == second["quantize"].model.format
    assert final.size_bytes < first["distill"].model.size_bytes
    assert final.nonzero_params < 0.7 * final.params


def test_transfer_limit_reads_only_the_first_rows(tmp_path):
    """distill.transfer_limit: rows past the limit never reach the student (scrambling them changes nothing)."""
    import numpy as np

    from shrinkflow.data import save_splits

    over = ["train_teacher.epochs=2", "prune.enabled=false", "quantize.enabled=false", "distill.student={arch: mlp, hidden: [8]}",
            "distill.epochs=2", "distill.transfer_limit=96", "distill.batch_size=32"]
    _chain(tmp_path, REPO / "params.yaml", over, ("data", "train_teacher"))
    paths = StagePaths(tmp_path)
    first = _chain(tmp_path, REPO / "params.yaml", over, ("distill",))["distill"]
    weights = torch.load(paths.model("distill"), weights_only=True)["state"]
    splits = load_splits(paths.splits)
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(
        splits,
        X_train=np.concatenate([splits.X_train[:96], rng.random(splits.X_train[96:].shape, dtype=np.float32)]),
        y_train=np.concatenate([splits.y_train[:96], rng.integers(0, 10, len(splits.y_train) - 96)]),
    )
    save_splits(scrambled, paths.splits)
    paths.teacher_outputs.unlink()  # computed again from the scrambled split: its first rows are the same
    second = _chain(tmp_path, REPO / "params.yaml", over, ("distill",))["distill"]
    again = torch.load(paths.model("distill"), weights_only=True)["state"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert first.val_metric == second.val_metric
    # Without the limit the same run trains on every row: other weights.
    _chain(tmp_path, REPO / "params.yaml", [*over, "distill.transfer_limit=null"], ("distill",))
    full = torch.load(paths.model("distill"), weights_only=True)["state"]
    assert not all(torch.equal(weights[k], full[k]) for k in weights)
