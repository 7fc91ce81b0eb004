"""What compression changed (shrinkflow.changes, the evaluate stage, ``shrinkflow changes``, dvc plots)
and the quality floor (a teacher no better than chance is flagged; min_accuracy on every variant)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, FAST, REPO, dvc, project_env, set_params, sh
from PIL import Image
from typer.testing import CliRunner

from schemas.changes import ChangesReport
from schemas.evaluate import EvaluateParams
from schemas.metrics import Metrics
from schemas.outputs import read_manifest
from schemas.paths import VARIANTS, StagePaths
from shrinkflow import changes
from shrinkflow.artifacts import save_model
from shrinkflow.cli import app
from shrinkflow.config import load_params
from shrinkflow.data import load_splits
from shrinkflow.loading import load_model
from shrinkflow.training import predict
from tasks.evaluate import _gates
from tasks.run import run_stage


def _logits_with_confidence(pred: torch.Tensor, conf: torch.Tensor, k: int) -> torch.Tensor:
    """Logits whose softmax gives ``conf`` to class ``pred`` and spreads the rest evenly."""
    probs = ((1 - conf) / (k - 1)).unsqueeze(1).repeat(1, k)
    probs[torch.arange(len(pred)), pred] = conf
    return probs.log()


# ------------------------------------------------------------------------ calibration


def test_ece_is_about_zero_for_a_calibrated_predictor_and_large_for_an_overconfident_one():
    g = torch.Generator().manual_seed(0)
    n, k = 200_000, 10
    pred = torch.randint(0, k, (n,), generator=g)
    conf = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    other = (pred + torch.randint(1, k, (n,), generator=g)) % k

    # Calibrated: right with exactly the probability it claims.
    right = torch.rand(n, generator=g, dtype=torch.float64) < conf
    y = torch.where(right, pred, other)
    logits = _logits_with_confidence(pred, conf, k)
    ece, bins = changes.reliability(conf, right)
    assert ece < 0.005
    assert sum(b.n for b in bins) == n and len(bins) == changes.ECE_BINS == 15
    for b in bins:
        if b.n > 1000:
            assert abs(b.accuracy - b.confidence) < 0.03
    # The same through the report, from logits and labels.
    report = changes.analyze({"teacher": logits}, y, "classification")
    assert report.variants["teacher"].ece == pytest.approx(ece, abs=1e-9)

    # Overconfident: claims 99 %, is right 60 % of the time.
    conf99 = torch.full((n,), 0.99, dtype=torch.float64)
    right60 = torch.rand(n, generator=g, dtype=torch.float64) < 0.6
    y60 = torch.where(right60, pred, other)
    over = _logits_with_confidence(pred, conf99, k)
    report = changes.analyze({"teacher": logits, "student": over}, y60, "classification")
    student = report.variants["student"]
    assert student.ece == pytest.approx(0.39, abs=0.01)
    top = student.reliability[-1]  # every input sits in the last bin, (14/15, 1]
    assert top.n == n and top.confidence == pytest.approx(0.99) and top.accuracy == pytest.approx(0.6, abs=0.01)
    assert student.ece_change == pytest.approx(student.ece - report.variants["teacher"].ece)


# ------------------------------------------------------------- flips, pictures, plot files


def test_plot_files_and_flip_grid_hold_what_they_claim(tmp_path):
    g = torch.Generator().manual_seed(1)
    n, k, examples = 300, 5, 11
    X = torch.rand(n, 1, 12, 12, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    teacher = torch.randn(n, k, generator=g) + 2.5 * torch.nn.functional.one_hot(y, k)
    student = teacher + 1.5 * torch.randn(n, k, generator=g)
    outputs = {"teacher": teacher, "student": student}
    folder = tmp_path / "reports" / "changes"
    report = changes.write_reports(changes.analyze(outputs, y, "classification", examples=examples), outputs, y, X, folder, tmp_path)

    # Independently: who flipped, in which direction, and how confident the student was.
    t_pred, s_pred = teacher.argmax(1), student.argmax(1)
    s_conf = torch.softmax(student.double(), 1).max(1).values
    t_conf = torch.softmax(teacher.double(), 1).max(1).values
    flipped = torch.nonzero(t_pred != s_pred).flatten().tolist()
    assert 20 < len(flipped) < n  # the fixture flips enough to fill a grid
    c = report.variants["student"]
    assert c.newly_wrong == int(((t_pred == y) & (s_pred != y)).sum())
    assert c.newly_right == int(((t_pred != y) & (s_pred == y)).sum())
    assert c.newly_wrong + c.newly_right + c.both_wrong_changed == len(flipped)
    expected = sorted(flipped, key=lambda i: -float(s_conf[i]))[:examples]
    assert [f.index for f in c.flips] == expected

    # The PNG: the grid of exactly those inputs, labelled with both predictions.
    png = tmp_path / c.flip_grid
    assert png == folder / "images" / "flips_student.png" and report.images["flips_student"] == c.flip_grid
    img = Image.open(png)
    rows, cols = changes.grid_layout(examples)
    assert img.size == (cols * changes.GRID_CELL_W, changes.GRID_TITLE + rows * changes.GRID_CELL_H)
    labels = img.text["Description"].splitlines()
    assert len(labels) == examples
    for line, i in zip(labels, expected, strict=True):
        assert line == (
            f"#{i} label {int(y[i])} | teacher {int(t_pred[i])} ({float(t_conf[i]):.2f}) | "
            f"student {int(s_pred[i])} ({float(s_conf[i]):.2f})"
        )
    gray = np.asarray(img.convert("L"), dtype=float)
    for tile, i in enumerate(expected):
        left, top, right, bottom = changes.tile_box(tile, examples)
        src = X[i, 0].numpy()
        h, w = src.shape
        # The drawn pixel at the centre of each input pixel's block.
        rr = (top + (np.arange(h) + 0.5) * (bottom - top) / h).astype(int)
        cc = (left + (np.arange(w) + 0.5) * (right - left) / w).astype(int)
        drawn = gray[np.ix_(rr, cc)]
        assert np.corrcoef(drawn.ravel(), src.ravel())[0, 1] > 0.99, f"tile {tile} does not show input #{i}"
    for tile in range(examples, rows * cols):  # the cells after the last tile are empty
        left, top, right, bottom = changes.tile_box(tile, examples)
        assert gray[top:bottom, left:right].min() > 250

    # dvc plots' data: per-class change in pp, per-input predictions, reliability per bin.
    delta = json.loads((folder / "delta.json").read_text())
    for row in delta:
        sel = y == int(row["group"])
        want = 100 * (float((s_pred[sel] == y[sel]).double().mean()) - float((t_pred[sel] == y[sel]).double().mean()))
        assert row["student"] == pytest.approx(want)
    assert [int(r["group"]) for r in delta] == list(range(k))
    preds = json.loads((folder / "predictions.json").read_text())
    assert [(r["actual"], r["teacher"], r["student"]) for r in preds] == list(zip(y.tolist(), t_pred.tolist(), s_pred.tolist(), strict=True))
    calib = json.loads((folder / "calibration.json").read_text())
    assert len(calib) == 15 and [r["student"] for r in calib] == [b.accuracy for b in c.reliability]
    for name in ("per_class", "reliability", "confusion_delta"):
        assert Image.open(tmp_path / report.images[name]).size[0] > 300
    assert ChangesReport.read(tmp_path) == report
    # The confusion difference: student counts minus teacher counts.
    cm = lambda p: torch.bincount(y * k + p, minlength=k * k).reshape(k, k)  # noqa: E731
    d = cm(s_pred) - cm(t_pred)
    assert c.confusion_delta == d.tolist()
    off = d - torch.diag(torch.diag(d))
    assert len(c.confusion_changes) == min(10, int((off != 0).sum()))
    assert abs(c.confusion_changes[0].delta) == int(off.abs().max())
    for cell in c.confusion_changes:
        assert cell.actual != cell.predicted and cell.delta == int(d[cell.actual, cell.predicted]) == cell.variant - cell.teacher


def test_tabular_inputs_get_no_flip_grid(tmp_path):
    y = torch.tensor([0, 1, 0, 1])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    outputs = {"teacher": teacher, "student": teacher.flip(1)}
    report = changes.analyze(outputs, y, "classification", classes=["cat", "dog"])
    report = changes.write_reports(report, outputs, y, torch.rand(4, 6), tmp_path / "c", tmp_path)
    s = report.variants["student"]
    assert (s.newly_wrong, s.newly_right, len(s.flips), s.flip_grid) == (4, 0, 4, None)
    assert not list((tmp_path / "c" / "images").glob("flips_*"))
    # Named classes are shown by name.
    assert [r["group"] for r in json.loads((tmp_path / "c" / "delta.json").read_text())] == ["cat", "dog"]
    assert json.loads((tmp_path / "c" / "predictions.json").read_text())[0] == {"actual": "cat", "teacher": "cat", "student": "dog"}
    assert "| cat | 2 | 100.00 % | 0.00 % | -100.00 pp |" in changes.render_summary(report, "student")


# ------------------------------------------------------------------------ regression


def test_a_regression_variant_gets_its_own_report(tmp_path):
    g = torch.Generator().manual_seed(2)
    n = 1000
    y = torch.randn(n, 1, generator=g)
    teacher = y + 0.1 * torch.randn(n, 1, generator=g)
    top = y[:, 0] > torch.quantile(y[:, 0], 0.8)
    student = teacher + top.unsqueeze(1).float()  # wrong by exactly +1 on the top fifth of y, identical elsewhere
    outputs = {"teacher": teacher, "student": student}
    report = changes.write_reports(changes.analyze(outputs, y, "regression", examples=5), outputs, y, torch.zeros(n, 10), tmp_path / "c", tmp_path)
    assert report.task == "regression"
    s = report.variants["student"]
    assert s.task == "regression"
    assert [q.quantile for q in s.by_quantile] == [1, 2, 3, 4, 5] and sum(q.n for q in s.by_quantile) == n
    for q in s.by_quantile[:4]:
        assert q.delta == 0.0  # untouched below the 80th percentile
    q5 = s.by_quantile[4]
    sel = top
    want = float(((student - y)[sel] ** 2).mean() - ((teacher - y)[sel] ** 2).mean())
    assert q5.n == int(sel.sum()) and q5.delta == pytest.approx(want)
    assert s.per_target[0].delta == pytest.approx(float(((student - y) ** 2).mean() - ((teacher - y) ** 2).mean()))
    assert len(s.worst) == 5
    for w in s.worst:
        assert bool(top[w.index]) and w.change == pytest.approx(1.0)
    assert json.loads((tmp_path / "c" / "predictions.json").read_text()) == []  # no confusion for regression
    assert json.loads((tmp_path / "c" / "calibration.json").read_text()) == []
    assert [r["student"] for r in json.loads((tmp_path / "c" / "delta.json").read_text())] == [q.delta for q in s.by_quantile]
    assert (tmp_path / report.images["error_by_quantile"]).is_file()
    assert "Error change by target quantile" in changes.render_summary(report, "student")
    # chance for regression: the variance of y
    assert report.chance.metric == "mse" and report.chance.baseline == pytest.approx(float(y.double().var(unbiased=False)))
    assert report.chance.passed


def test_dvc_yaml_plots_the_files_evaluate_writes():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = StagePaths(REPO)
    folder = paths.rel(paths.changes)
    assert {folder: {"cache": False}} in spec["stages"]["evaluate"]["outs"]
    plotted, bars = set(), set()
    for entry in spec["plots"]:
        name, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if props is None:
            plotted.add(name)
            continue
        for file in (props.get("y") if isinstance(props.get("y"), dict) else {}):
            plotted.add(file)
            if file.endswith(changes.DELTA_PLOT):
                bars.add(props["x"])
    assert {f"{folder}/{f}" for f in (changes.DELTA_PLOT, changes.PREDICTIONS_PLOT, changes.CALIBRATION_PLOT, changes.IMAGES)} <= plotted
    assert bars == set(VARIANTS.values()) - {"teacher"}  # one bar chart per compressed variant


# ------------------------------------------------------------------------------ gates


def _row(**kw):
    common = dict(agreement=1.0, size_bytes=1, params=1, nonzero_params=1, sparsity=0.0, layer_sparsity={}, macs=None,
                  format="fp32", path="m.pt", compression_ratio=1.0, latency_ms_b1=1.0)
    return {**common, **kw}


def test_min_accuracy_applies_to_every_variant_and_ece_gate_to_the_final_model():
    metrics = Metrics.model_validate({
        "teacher": _row(accuracy=0.95, ece=0.02, newly_wrong=0, newly_right=0, worst_class_drop=0.0),
        "pruned": _row(accuracy=0.80, ece=0.03, newly_wrong=5, newly_right=1, worst_class_drop=0.3),
        "student": _row(accuracy=0.94, ece=0.06, newly_wrong=2, newly_right=1, worst_class_drop=0.02),
    })
    gates = {g.name: g for g in _gates(EvaluateParams(gates={"min_accuracy": 0.9, "max_ece_increase": 0.03, "max_class_drop": 0.05}), metrics, "classification")}
    assert [gates[f"min_accuracy_{v}"].passed for v in ("teacher", "pruned", "student")] == [True, False, True]
    assert gates["max_ece_increase"].value == pytest.approx(0.04) and not gates["max_ece_increase"].passed
    assert gates["max_class_drop"].value == 0.02 and gates["max_class_drop"].passed  # the final model's, not pruned's
    # regression rows carry no classification columns
    with pytest.raises(ValueError, match="classification-only"):
        Metrics.model_validate({"teacher": _row(mse=0.1, ece=0.0)})


def test_the_chance_floor_for_both_tasks():
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    always0 = torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 3).float()
    c = changes.chance(y, "classification", always0)
    assert (c.baseline, c.teacher, c.passed) == (0.6, 0.6, False)  # predicting the majority class is chance
    assert c.limit == pytest.approx(0.6 + 2.326 * (0.6 * 0.4 / 100) ** 0.5)
    perfect = torch.nn.functional.one_hot(y, 3).float()
    assert changes.chance(y, "classification", perfect).passed
    yr = torch.linspace(-1, 1, 50).unsqueeze(1)
    assert not changes.chance(yr, "regression", torch.zeros_like(yr)).passed  # predicting the mean
    assert changes.chance(yr, "regression", yr + 0.01).passed


# ----------------------------------------------- the evaluate stage on a deliberately damaged class


def _chain(root: Path, overrides: list[str], stages):
    params = load_params(REPO / "params.yaml", overrides, root=root)
    return {s: run_stage(s, params, root) for s in stages}


def test_a_damaged_class_shows_exactly_its_drop_and_fails_the_class_gate(tmp_path):
    overrides = [*FAST, "prune.enabled=false", "quantize.enabled=false", "distill.enabled=false", "evaluate.pack=none",
                 "evaluate.gates.max_class_drop=0.2", "evaluate.gates.min_compression_ratio=null"]
    out = _chain(tmp_path, overrides, ("data", "train_teacher", "prune", "quantize", "distill", "evaluate"))
    paths = StagePaths(tmp_path)
    # Undamaged (the student is the teacher's file): nothing changed, the gate passes.
    gate = {g.name: g for g in out["evaluate"].gates}
    assert gate["max_class_drop"].passed and gate["max_class_drop"].value == 0.0
    assert gate["teacher_above_chance"].passed
    s = ChangesReport.read(tmp_path).variants["student"]
    assert (s.newly_wrong, s.newly_right, s.worst_class, s.flips) == (0, 0, None, [])

    # Damage one class: lower its output bias until the student never predicts it.
    teacher, header = load_model(paths.model("train_teacher"))
    X, y = load_splits(paths.splits).tensors("test")
    t_out = predict(teacher, X)
    t_pred = t_out.argmax(1)
    c = int(torch.bincount(y[t_pred == y], minlength=10).argmax())  # the class the teacher gets right most often
    damaged, _ = load_model(paths.model("train_teacher"))
    with torch.no_grad():
        damaged.net[-1].bias[c] -= 1000.0
    save_model(damaged, paths.model("distill"), header)
    manifest = _chain(tmp_path, overrides, ("evaluate",))["evaluate"]

    # Expected from the construction alone: only inputs the teacher assigned to c change, to its second choice.
    second = t_out.topk(2, dim=1).indices[:, 1]
    mine = t_pred == c
    teacher_acc_c = float((t_pred[y == c] == c).double().mean())
    report = ChangesReport.read(tmp_path)
    s = report.variants["student"]
    assert s.worst_class == c
    assert s.per_class[c].accuracy == 0.0 and s.per_class[c].delta == pytest.approx(-teacher_acc_c)
    assert s.worst_class_drop == pytest.approx(teacher_acc_c)
    assert all(r.delta >= 0 for r in s.per_class if r.label != c)  # the others can only gain
    assert s.newly_wrong == int((mine & (y == c)).sum())
    assert s.newly_right == int((mine & (y != c) & (second == y)).sum())
    assert s.both_wrong_changed == int((mine & (y != c) & (second != y)).sum())
    assert all(f.teacher == c and f.variant != c for f in s.flips)
    row = Metrics.read(tmp_path)["student"]
    assert (row.newly_wrong, row.newly_right, row.worst_class_drop) == (s.newly_wrong, s.newly_right, s.worst_class_drop)
    # The per-class gate fails on it, naming the class, and the verdict says so.
    gate = {g.name: g for g in manifest.gates}["max_class_drop"]
    assert not gate.passed and gate.value == pytest.approx(teacher_acc_c) and f"class {c}:" in gate.detail
    assert not manifest.passed and read_manifest("evaluate", tmp_path).passed is False
    assert "max_class_drop: " in paths.report.read_text() and "FAIL" in paths.report.read_text()

    # The terminal view of the same report.
    runner = CliRunner()
    res = runner.invoke(app, ["changes", "student", "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"| {c} | {int((y == c).sum())} | {100 * teacher_acc_c:.2f} % | 0.00 % | {-100 * teacher_acc_c:+.2f} pp |" in res.output
    assert f"newly wrong {s.newly_wrong:,}, newly right {s.newly_right:,}" in res.output
    res = runner.invoke(app, ["changes", "--root", str(tmp_path)])
    assert res.exit_code == 0 and "| student |" in res.output and "| pruned |" in res.output
    res = runner.invoke(app, ["changes", "studnet", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "no variant 'studnet'" in res.output
    res = runner.invoke(app, ["changes", "--root", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "run the pipeline first" in res.output


# ----------------------------------------------------------- through dvc repro (the user's door)


@pytest.mark.slow
def test_through_dvc_repro_a_chance_teacher_is_flagged_and_the_diffs_show_what_changed(project):
    # The worked example of docs/what-changed.md: commit a run, change one param, compare. The param here
    # is the reproduction of a useless teacher: lr=10 leaves it at chance, every stage processes it
    # and max_accuracy_drop reads 0 and passes.
    env = project_env()
    dvc(project, "repro")
    sh(["git", "add", "-A"], project, env=env)
    sh(["git", "add", "-f", "reports"], project, env=env)  # cache: false outputs live in git (the fixture ignores reports/)
    sh(["git", "commit", "-q", "-m", "baseline"], project, env=env)
    assert {g.name: g for g in read_manifest("evaluate", project).gates}["teacher_above_chance"].passed  # a trained teacher

    set_params(project, ["train_teacher.optimizer.lr=10", "train_teacher.epochs=2"])
    proc = dvc(project, "repro")
    assert proc.returncode == 0  # the stages ran; the verdict is the gate
    assert "gate teacher_above_chance failed" in proc.stdout + proc.stderr
    assert "no better than chance" in proc.stdout + proc.stderr
    evaluation = read_manifest("evaluate", project)
    gates = {g.name: g for g in evaluation.gates}
    chance = gates["teacher_above_chance"]
    assert not chance.passed and not evaluation.passed
    assert chance.value <= chance.limit and 0.05 < chance.value < 0.2
    assert "check train_teacher" in chance.detail
    res = sh([str(BIN / "shrinkflow"), "changes"], project)
    assert "**is no better than chance**" in res.stdout

    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)["reports/metrics.json"]
    assert {"teacher.accuracy", "teacher.ece", "student.ece"} <= set(diff)
    plots = json.loads(dvc(project, "plots", "diff", "--json").stdout)
    assert not plots.get("errors")
    for plot in ("student_vs_teacher", "confusion", "calibration", "reports/changes/images/per_class.png"):
        assert plots["data"].get(plot), plot
    bars = plots["data"]["student_vs_teacher"][0]
    assert set(bars["revisions"]) == {"HEAD", "workspace"}
    values = bars["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"HEAD", "workspace"} and {v["group"] for v in values} == {str(i) for i in range(10)}
    now = ChangesReport.read(project).variants["student"]
    assert sorted(v["student"] for v in values if v["rev"] == "workspace") == pytest.approx(sorted(100 * r.delta for r in now.per_class))
