"""evaluate packs the chosen variant and reports the packed file's size and accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO

from schemas.paths import STAGES
from shrinkflow.config import load_params
from shrinkflow.data import load_splits
from shrinkflow.loading import load_model
from shrinkflow.packing import is_packed
from shrinkflow.training import predict, quality
from tasks.run import run_stage


@pytest.mark.slow
def test_evaluate_reports_the_packed_student(tmp_path: Path):
    params = load_params(REPO / "params.yaml", FAST, root=tmp_path)
    assert params.evaluate.pack == "student"
    for stage in STAGES:
        run_stage(stage, params, tmp_path)
    packed = tmp_path / "models/evaluate/student.sfz"
    assert is_packed(packed)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    student = metrics["student"]
    assert student["size_bytes"] == packed.stat().st_size
    assert student["path"] == "models/evaluate/student.sfz"
    assert student["size_bytes"] < (tmp_path / "models/distill/model.pt").stat().st_size
    # Accuracy is the packed file's: loaded from it.
    splits = load_splits(tmp_path / "data/prepared/splits.npz")
    X, y = splits.tensors("test")
    from_sfz, _ = load_model(packed)
    assert student["accuracy"] == quality(predict(from_sfz, X), y, "classification")
    # evaluate.pack_precision: predictions (the default) keeps every validation prediction of the .pt student.
    from_pt, _ = load_model(tmp_path / "models/distill/model.pt")
    Xv, _ = splits.tensors("val")
    assert torch.equal(predict(from_sfz, Xv).argmax(1), predict(from_pt, Xv).argmax(1))
    report = (tmp_path / "reports/report.md").read_text()
    assert "## Packed file (`student`)" in report
    for part in ("| biases |", "| header |", "| table |", "| container |", "| tensor | shape |", "validation examples"):
        assert part in report, part
    summary = json.loads((tmp_path / "models/evaluate/pack.json").read_text())
    assert sum(summary["breakdown"].values()) == student["size_bytes"]
    assert summary["checked"] == len(Xv) and summary["format_version"] == 2
    assert {t["name"] for t in summary["tensors"] if t["precision"] != "exact"} == set(summary["rounded"])
