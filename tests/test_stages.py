"""The chain run in-process, stage by stage: presets, import, pass-through, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, FAST, REPO, project_env

from schemas.outputs import read_manifest
from schemas.paths import STAGES, StagePaths
from shrinkflow.config import load_params
from shrinkflow.errors import InputError, TrainingDiverged
from shrinkflow.loading import load_model
from tasks.run import run_stage


def run_chain(root: Path, params_file: Path, overrides: list[str], stages=STAGES):
    params = load_params(params_file, overrides, root=root)
    return {s: run_stage(s, params, root) for s in stages}


def test_seed_regression_preset_reports_mse(tmp_path):
    out = run_chain(
        tmp_path, REPO / "examples/seed-regression/params.yaml",
        ["train_teacher.epochs=10", "evaluate.min_run_time=0.05"],
    )
    assert out["data"].task == "regression" and out["data"].input_shape == [10]
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    for m in metrics.values():
        assert "mse" in m and "accuracy" not in m
    # The teacher learned something: far better than predicting the mean.
    data = np.load(tmp_path / "data/prepared/splits.npz")
    assert metrics["teacher"]["mse"] < 0.5 * float(data["y_test"].var())
    # agreement is the MSE to the teacher: zero for the teacher itself, small for the student
    assert metrics["teacher"]["agreement"] == 0.0
    assert metrics["student"]["agreement"] < metrics["teacher"]["mse"]


def test_import_checkpoint_skips_training(tmp_path):
    first = run_chain(tmp_path, REPO / "params.yaml", FAST, stages=("data", "train_teacher"))
    teacher, _ = load_model(StagePaths(tmp_path).model("train_teacher"))
    torch.save(teacher.state_dict(), tmp_path / "trained.pt")
    second = run_chain(
        tmp_path, REPO / "params.yaml", [*FAST, "train_teacher.checkpoint=trained.pt"], stages=("data", "train_teacher")
    )
    assert second["train_teacher"].imported and second["train_teacher"].epochs == 0
    assert second["train_teacher"].val_metric == pytest.approx(first["train_teacher"].val_metric)
    # A checkpoint for another architecture is refused with the field named.
    with pytest.raises(InputError, match="train_teacher.checkpoint"):
        run_chain(
            tmp_path, REPO / "params.yaml",
            [*FAST, "train_teacher.checkpoint=trained.pt", "train_teacher.model.hidden=[7]"], stages=("train_teacher",),
        )


def test_disabled_stages_pass_through_byte_identical(tmp_path):
    run_chain(
        tmp_path, REPO / "params.yaml",
        # evaluate.pack=none: report the .pt files (a packed student would be a smaller file).
        [*FAST, "prune.enabled=false", "quantize.enabled=false", "distill.enabled=false", "evaluate.pack=none"],
    )
    paths = StagePaths(tmp_path)
    teacher = paths.model("train_teacher").read_bytes()
    for stage in ("prune", "quantize", "distill"):
        assert paths.model(stage).read_bytes() == teacher
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["student"]["accuracy"] == metrics["teacher"]["accuracy"]
    assert metrics["student"]["compression_ratio"] == 1.0
    assert read_manifest("evaluate", tmp_path).final_variant == "student"


def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    preset = REPO / "examples/seed-regression/params.yaml"
    run_chain(tmp_path, preset, [], stages=("data",))
    with pytest.raises(TrainingDiverged, match=r"train_teacher.optimizer.lr \(now 10"):
        run_chain(tmp_path, preset, ["train_teacher.optimizer.lr=10"], stages=("train_teacher",))
    assert not StagePaths(tmp_path).model("train_teacher").exists()


def test_stage_killed_midway_leaves_no_artifact_and_rerun_completes(tmp_path):
    run_chain(tmp_path, REPO / "params.yaml", FAST, stages=("data",))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = project_env()
    proc = subprocess.Popen(
        [str(BIN / "shrinkflow"), "stage", "train_teacher"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    live = tmp_path / "reports/live/train_teacher"
    deadline = time.time() + 120
    while time.time() < deadline and not live.exists():  # training has started
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    model_dir = StagePaths(tmp_path).model_dir("train_teacher")
    assert not StagePaths(tmp_path).model("train_teacher").exists()
    assert not StagePaths(tmp_path).manifest("train_teacher").exists()
    # rerun completes
    subprocess.run([str(BIN / "shrinkflow"), "stage", "train_teacher"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)
    assert StagePaths(tmp_path).model("train_teacher").exists()
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]
