"""evaluate packs the chosen variant and reports the packed file's size and accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    # Accuracy is the packed file's, which computes what the .pt student computes.
    X, y = load_splits(tmp_path / "data/prepared/splits.npz").tensors("test")
    from_pt, _ = load_model(tmp_path / "models/distill/model.pt")
    assert student["accuracy"] == quality(predict(from_pt, X), y, "classification")
    report = (tmp_path / "reports/report.md").read_text()
    assert "## Packed file (`student`)" in report
    for part in ("indices", "codebooks", "positions", "overhead"):
        assert f"| {part} |" in report
    summary = json.loads((tmp_path / "models/evaluate/pack.json").read_text())
    assert sum(summary["breakdown"].values()) == student["size_bytes"]
