"""The prune stage in-process on digits: schedules, baselines, structured user modules, sensitivity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO
from typer.testing import CliRunner

from schemas.paths import StagePaths
from shrinkflow.config import load_params
from shrinkflow.loading import load_model
from shrinkflow.masks import prunable, sparsity
from shrinkflow.measure import macs
from shrinkflow.pruning.magnitude import MASKERS
from tasks.run import run_stage

RESNET = 'train_teacher.model={arch: module, import: "tests.toy_models:ResNetTiny", kwargs: {width: 8}}'


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared CPU: a second thread only adds contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def params(root: Path, extra: list[str]):
    # These tests measure what each method reaches (targets, zeros, MACs of the same layers); removing the
    # units it left without weights shrinks the layers afterwards and is tested in test_dead_units.py.
    return load_params(REPO / "params.yaml", [*FAST, "prune.dead_units=false", *extra], root=root)


def _trained(tmp_path_factory, name: str, extra: list[str]) -> Path:
    root = tmp_path_factory.mktemp(name)
    for stage in ("data", "train_teacher"):
        run_stage(stage, params(root, extra), root)
    return root


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "mlp", [])


@pytest.fixture
def root(digits_mlp, tmp_path) -> Path:
    """A fresh copy of a project with prepared digits and a trained MLP teacher."""
    dest = tmp_path / "proj"
    shutil.copytree(digits_mlp, dest)
    return dest


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["prune.schedule=iterative", "prune.rounds=2"],
        ["prune.schedule=gradual", "prune.finetune.epochs=2", "prune.initial_sparsity=0.2", "prune.prune_every=5"],
        ["prune.finetune.distill_from_teacher=true", "prune.scope=layer", 'prune.layers={"net.5": 0.5}'],
    ],
    ids=["one-shot", "iterative", "gradual", "distill-layer-override"],
)
def test_targets_met_and_zeros_survive_finetuning(root, extra):
    p = params(root, extra)
    out = run_stage("prune", p, root)
    model, header = load_model(StagePaths(root).model("prune"))
    assert header.masked and header.storage == "sparse"
    if "prune.scope=layer" in extra:
        assert out.layer_sparsity["net.5.weight"] == pytest.approx(0.5, abs=0.005)
        for k in ("net.1.weight", "net.3.weight"):
            assert out.layer_sparsity[k] == pytest.approx(p.prune.sparsity, abs=0.005)
    else:
        assert out.sparsity == pytest.approx(p.prune.sparsity, abs=0.005)
    teacher, _ = load_model(StagePaths(root).model("train_teacher"))
    if not extra:
        # One-shot: the zeros after fine-tuning are exactly the weights pruned before it.
        masks = MASKERS["magnitude"](teacher, p.prune, 1.0)
        for k, w in prunable(model).items():
            assert torch.equal(w != 0, masks[k]), k
    # Fine-tuning did change the weights that were kept.
    kept = [(w != 0) for w in prunable(model).values()]
    assert any(not torch.equal(w[m], t[m]) for w, t, m in zip(prunable(model).values(), prunable(teacher).values(), kept, strict=True))
    assert out.val_metric > 0.8
    assert out.model.size_bytes < 0.5 * (root / "models/train_teacher/model.pt").stat().st_size


def test_random_baseline_is_worse_than_magnitude(root):
    runs = {}
    for method in ("magnitude", "random"):
        runs[method] = run_stage("prune", params(root, [f"prune.method={method}", "prune.finetune.epochs=0"]), root)
        assert runs[method].sparsity == pytest.approx(0.8, abs=0.005)
    assert runs["magnitude"].val_metric > runs["random"].val_metric + 0.1


def test_pruned_file_shrinks_through_the_chain_and_metrics_report_sparsity_and_macs(root):
    p = params(root, [])
    for stage in ("prune", "quantize", "distill", "evaluate"):
        run_stage(stage, p, root)
    metrics = json.loads(StagePaths(root).metrics.read_text())
    assert metrics["teacher"]["sparsity"] == 0.0
    for v in ("pruned", "quantized", "student"):
        assert metrics[v]["sparsity"] == pytest.approx(0.8, abs=0.01), v
        assert metrics[v]["size_bytes"] < 0.5 * metrics["teacher"]["size_bytes"], v
        assert metrics[v]["macs"] == metrics["teacher"]["macs"] > 0  # zeros are still multiplied
        assert set(metrics[v]["layer_sparsity"]) == {"net.1.weight", "net.3.weight", "net.5.weight"}


def test_structured_user_module_with_batchnorm_and_residual(tmp_path_factory, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `import: tests.toy_models:...` resolves from the project root
    fast = ["train_teacher.epochs=2", "train_teacher.batch_size=128", "prune.finetune.batch_size=128"]
    root = _trained(tmp_path_factory, "resnet", [RESNET, *fast])
    p = params(root, [RESNET, *fast, "prune.method=structured", "prune.schedule=iterative", "prune.rounds=2", "prune.sparsity=0.5"])
    out = run_stage("prune", p, root)
    assert out.model.params < 0.6 * out.teacher_params
    assert out.macs < 0.6 * out.teacher_macs
    model, header = load_model(StagePaths(root).model("prune"), ["tests.toy_models"])  # this suite's own class
    assert [t["kind"] for t in header.transforms] == ["structured"] and not header.masked
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    blocks = model.blocks
    # The residual add keeps the stem and every block's second conv at one width.
    assert blocks[0].conv2.out_channels == blocks[1].conv2.out_channels == model.stem[0].out_channels < 8
    # The later stages replay the change from the file (quantize, then train the float equivalent).
    for stage in ("quantize", "distill"):
        last = run_stage(stage, p, root)
    student, header = load_model(StagePaths(root).model("distill"), ["tests.toy_models"])
    assert last.model.params == out.model.params
    assert macs(student, header) == out.macs
    assert student(x).shape == (5, 10)


def test_sensitivity_report_and_auto_allocation(root):
    out = run_stage("prune", params(root, ["prune.sensitivity=true", "prune.allocation=auto", "prune.sparsity=0.85"]), root)
    folder = root / "reports/sensitivity"
    table = json.loads((folder / "sensitivity.json").read_text())
    assert set(table["layers"]) == {"net.1", "net.3", "net.5"}
    assert (folder / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| net.1 |" in (folder / "sensitivity.md").read_text()
    assert len(json.loads((folder / "curves.json").read_text())) == len(table["layers"]["net.1"]["quality"])
    assert out.sparsity == pytest.approx(0.85, abs=0.005)
    assert set(out.allocation) == {"net.1", "net.3", "net.5"}
    assert len({round(v, 3) for v in out.allocation.values()}) > 1  # not uniform
    # Disabled again: the folder stays (DVC tracks it) and says how to turn it on.
    run_stage("prune", params(root, ["prune.finetune.epochs=0"]), root)
    assert not (folder / "sensitivity.png").exists()
    assert "prune.sensitivity" in (folder / "sensitivity.md").read_text()


def test_sensitivity_command(root, monkeypatch):
    from shrinkflow.cli import app

    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["sensitivity", "--sparsities", "0.5,0.9"])
    assert result.exit_code == 0, result.output
    assert "| net.3 |" in result.output and "90%" in result.output
    bad = CliRunner().invoke(app, ["sensitivity", "--sparsities", "0.5,1.5"])
    assert bad.exit_code == 2 and "--sparsities" in bad.output
    teacher, _ = load_model(StagePaths(root).model("train_teacher"))
    assert sparsity(teacher)[0] == 0.0  # analysing does not touch the model file
