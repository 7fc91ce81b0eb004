"""Edges and faults, through the door a user uses: a model file never runs code, bad input exits 2
with the problem named, and nothing already produced is damaged.

Each test asserts the exit status, the message, and that the files were left as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, REPO, dvc, make_project, project_env, set_params, sh
from typer.testing import CliRunner

import shrinkflow
from shrinkflow.artifacts import FORMAT_VERSION, MAX_PARAMS, ModelHeader, save_model
from shrinkflow.cli import app
from shrinkflow.errors import InputError, UntrustedModel
from shrinkflow.packing import container

runner = CliRunner()

#: A header that names os.system as the model class, with a command that leaves a marker.
def evil_header(marker: Path) -> dict:
    return {
        "spec": {"arch": "module", "import": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "input_shape": [4], "out_features": 2, "task": "classification",
    }


def evil_pt(path: Path, marker: Path) -> Path:
    torch.save({"shrinkflow": FORMAT_VERSION, "header": evil_header(marker), "state": {}}, path)
    return path


def evil_sfz(path: Path, marker: Path) -> Path:
    """A packed file of the current version whose header is swapped for the hostile one, re-sealed:
    magic, lengths and CRC all valid."""
    from shrinkflow.packing import pack_model

    h = ModelHeader(spec={"arch": "mlp", "hidden": [3]}, input_shape=[4], out_features=2, task="classification")
    pack_model(h.build(), h, path)
    _, meta, payload = container.decode(path.read_bytes(), str(path))
    key = next(k for k in ("h", "header") if k in meta)
    data, _ = container.encode({**meta, key: evil_header(marker)}, bytes(payload))
    path.write_bytes(data)
    return path


def evil_sfz_v1(path: Path, marker: Path) -> Path:
    """The same in format version 1 (still read): zlib JSON metadata, no tensors."""
    import struct
    import zlib

    meta = zlib.compress(json.dumps({"header": evil_header(marker), "tensors": [], "qparams": []}).encode())
    body = struct.pack("<8sHHII", container.MAGIC, 1, 0, len(meta), 0) + meta
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return path


@pytest.fixture
def files(tmp_path):
    marker = tmp_path / "marker"
    return marker, evil_pt(tmp_path / "evil.pt", marker), evil_sfz(tmp_path / "evil.sfz", marker)


# ------------------------------------------------------------------ 1. loading runs no code


def test_malicious_headers_run_nothing_through_load(files, tmp_path):
    marker, pt, sfz = files
    for path in (pt, sfz, evil_sfz_v1(tmp_path / "evil-v1.sfz", marker)):
        with pytest.raises(UntrustedModel, match="os:system"):
            shrinkflow.load(path)
        # Even a caller who trusts `os` only gets the class check: os.system is no nn.Module subclass.
        with pytest.raises(InputError, match="not a torch.nn.Module subclass"):
            shrinkflow.load(path, allow=["os"])
    assert not marker.exists()


@pytest.mark.parametrize("command", [["predict", "{f}", "{x}"], ["export", "{f}", "{o}"], ["pack", "{f}", "{o}"]],
                         ids=["predict", "export", "pack"])
def test_malicious_headers_run_nothing_through_the_cli(files, tmp_path, command):
    marker, pt, sfz = files
    np.save(tmp_path / "x.npy", np.zeros((2, 4), dtype=np.float32))
    for path in (pt, sfz):
        args = [a.format(f=path, x=tmp_path / "x.npy", o=tmp_path / "out.bin") for a in command]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "os:system" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out.bin").exists()


def test_malicious_checkpoint_runs_nothing_through_dvc_repro(tmp_path):
    root = make_project(tmp_path / "proj")
    marker = root / "marker"
    evil_pt(root / "evil.pt", marker)
    set_params(root, ["train_teacher.checkpoint=evil.pt"])
    proc = dvc(root, "repro", "train_teacher", check=False)
    assert proc.returncode != 0
    assert "os:system" in proc.stdout + proc.stderr and "trusted_modules" in proc.stdout + proc.stderr
    assert not marker.exists() and not (root / "models/train_teacher/model.pt").exists()


def test_header_sizes_are_bounded_before_anything_is_built(tmp_path):
    base = {"input_shape": [784], "out_features": 10, "task": "classification"}
    for spec in ({"arch": "mlp", "hidden": [10**9]}, {"arch": "mlp", "hidden": [2**20, 2**20]}):
        path = tmp_path / "big.pt"
        torch.save({"shrinkflow": FORMAT_VERSION, "header": {**base, "spec": spec}, "state": {}}, path)
        with pytest.raises(InputError, match="invalid model header"):
            shrinkflow.load(path)
    with pytest.raises(ValueError, match=f"more than the {MAX_PARAMS:,}"):
        ModelHeader(spec={"arch": "mlp", "hidden": [2**20, 2**20]}, **base)
    # A (version 1) .sfz that announces a tensor larger than its architecture is refused before
    # decoding; version 2 files take every shape from the architecture.
    import struct
    import zlib

    h = ModelHeader(spec={"arch": "mlp", "hidden": [8]}, **{**base, "input_shape": [4]})
    entry = {"name": "net.1.weight", "shape": [10**6, 10**6], "dtype": "float32", "layout": "dense",
             "values": {"kind": "raw", "dtype": "float32", "off": 0, "len": 0}}
    meta = zlib.compress(json.dumps({"header": h.model_dump(mode="json"), "tensors": [entry], "qparams": []}).encode())
    body = struct.pack("<8sHHII", container.MAGIC, 1, 0, len(meta), 0) + meta
    (tmp_path / "big.sfz").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(InputError, match=r"shaped \[1000000, 1000000\], the architecture needs \[8, 4\]"):
        shrinkflow.load(tmp_path / "big.sfz")


def test_files_that_are_not_ours_get_a_truthful_message(tmp_path):
    (tmp_path / "empty.sfz").write_bytes(b"")
    (tmp_path / "random.sfz").write_bytes(os.urandom(4096))
    for name in ("empty.sfz", "random.sfz"):
        result = runner.invoke(app, ["predict", str(tmp_path / name), str(tmp_path / "x.npy")])
        assert result.exit_code == 2
        assert "is not a model file" in result.output and "weights_only=False" not in result.output


# ------------------------------------------------------------------ 2. every enabled combination through dvc repro


@pytest.mark.slow
def test_every_enabled_combination_runs_through_dvc_repro(project):
    dvc(project, "repro")
    for prune in (True, False):
        for quantize in (True, False):
            for distill in (True, False):
                set_params(project, [f"prune.enabled={str(prune).lower()}", f"quantize.enabled={str(quantize).lower()}",
                                     f"distill.enabled={str(distill).lower()}"])
                proc = dvc(project, "repro", check=False)
                assert proc.returncode == 0, (prune, quantize, distill, proc.stdout[-2000:], proc.stderr[-2000:])
                metrics = json.loads((project / "reports/metrics.json").read_text())
                assert set(metrics) == {"teacher", "pruned", "quantized", "student"}
                for stage, on, upstream in (("prune", prune, "train_teacher"), ("quantize", quantize, "prune"),
                                            ("distill", distill, "quantize")):
                    same = (project / f"models/{stage}/model.pt").read_bytes() == (project / f"models/{upstream}/model.pt").read_bytes()
                    assert same != on, (stage, on)  # a disabled stage passes its input through byte for byte
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


# ------------------------------------------------------------------ 3. validate checks what it can before any work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('train_teacher.model={arch: module, import: "no_such_pkg.models:Net"}', "cannot import module 'no_such_pkg.models'"),
        ('train_teacher.model={arch: module, import: "os:system"}', "not a torch.nn.Module subclass"),
        ('distill.student={arch: module, import: "json:dumps"}', "distill.student.import"),
        ("train_teacher.checkpoint=params.yaml", "is not a model file"),
        ("data={source: npz, path: data/raw/README.md}", "is not a readable .npz file"),
    ],
    ids=["missing-module", "not-a-class", "student", "checkpoint-not-a-model", "unreadable-data"],
)
def test_validate_catches_what_would_fail_later(tmp_path, override, message):
    root = make_project(tmp_path / "proj")
    set_params_unchecked(root, override)
    before = (root / "params.yaml").read_bytes()
    proc = sh([str(BIN / "shrinkflow"), "validate"], root, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (root / "params.yaml").read_bytes() == before


def test_validate_accepts_a_user_module_that_is_a_module(tmp_path):
    root = make_project(tmp_path / "proj")
    (root / "nets.py").write_text("from torch import nn\n\nclass Net(nn.Sequential):\n    pass\n")
    set_params(root, ['train_teacher.model={arch: module, import: "nets:Net"}'])
    assert sh([str(BIN / "shrinkflow"), "validate"], root).returncode == 0


def set_params_unchecked(root: Path, override: str) -> None:
    """Write an override into params.yaml without validating it (the validation is under test)."""
    import yaml

    from shrinkflow.config import parse_override

    keys, value = parse_override(override)
    data = yaml.safe_load((root / "params.yaml").read_text())
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------ 4. params edits go under DVC's lock


@pytest.mark.slow
def test_run_with_set_refuses_while_dvc_repro_trains(project):
    set_params(project, ["train_teacher.epochs=400"])  # long enough to be caught training
    before = (project / "params.yaml").read_bytes()
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=project_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (project / "reports/data.json").exists():  # the data stage is done: train_teacher runs
            assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read() if repro.stdout else ""
            time.sleep(0.2)
        proc = sh([str(BIN / "shrinkflow"), "run", "--set", "train_teacher.epochs=5"], project, check=False)
        assert proc.returncode == 75, proc.stdout + proc.stderr
        assert f"busy (PID {repro.pid}" in proc.stderr and "nothing was changed" in proc.stderr
        assert (project / "params.yaml").read_bytes() == before
    finally:
        os.killpg(repro.pid, 15)
        repro.wait(30)


# ------------------------------------------------------------------ 5. a failing run is short


@pytest.mark.slow
def test_a_failing_stage_ends_the_run_with_its_own_message_and_status(project):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 100).astype(float)
    y[5] = np.nan
    np.savez(project / "data/raw/nan.npz", X=rng.normal(size=(100, 4)), y=y)
    before = (project / "params.yaml").read_bytes()
    proc = sh([str(BIN / "shrinkflow"), "run", "--set", "data={source: npz, path: data/raw/nan.npz, task: classification}"],
              project, check=False)
    assert proc.returncode == 2
    assert "stage 'data' failed (exit 2): data.path 'data/raw/nan.npz': y contains NaN" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) <= 6, proc.stdout + proc.stderr
    log = (project / ".shrinkflow/logs/run.log").read_text()
    assert "y contains NaN" in log and "Traceback" in log  # the whole story is in the log
    assert (project / "params.yaml").read_bytes() == before  # the failed run's edit was undone


@pytest.mark.slow
def test_a_failed_run_leaves_the_workspace_as_it_was(project):
    """DVC deletes a stage's outputs before running it: a failed run brings the last good ones back."""
    dvc(project, "repro")
    kept = ["params.yaml", "dvc.lock", "reports/metrics.json",
            *(str(p.relative_to(project)) for p in sorted((project / "models").rglob("*")) if p.is_file())]
    before = {p: (project / p).read_bytes() for p in kept}
    # A student class that imports (validate passes) but cannot be built: the distill stage fails.
    proc = sh([str(BIN / "shrinkflow"), "run", "--set", "distill.student={arch: module, import: 'torch.nn:Linear'}"],
              project, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stage 'distill' failed (exit 2): distill.student: torch.nn:Linear" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: (project / p).read_bytes() for p in kept} == before
    assert "up to date" in dvc(project, "status").stdout


# ------------------------------------------------------------------ 6. data validation in the data stage


def _stage_data(root: Path, X, y, **extra) -> subprocess.CompletedProcess:
    np.savez(root / "data/raw/d.npz", X=X, y=y, **extra)
    return sh([str(BIN / "shrinkflow"), "stage", "data"], root, check=False)


@pytest.fixture(scope="module")
def data_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("data") / "proj")
    rng = np.random.default_rng(0)
    np.savez(root / "data/raw/d.npz", X=rng.normal(size=(60, 3)), y=rng.integers(0, 3, 60))
    set_params(root, ["data={source: npz, path: data/raw/d.npz}"])
    assert _stage_data(root, rng.normal(size=(60, 3)), rng.integers(0, 3, 60)).returncode == 0
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("strings", "set data.task: classification"),
        ("digit-strings", "set data.task: classification"),
        ("empty", "X has no rows"),
        ("one-row", "too few for the splits"),
        ("nan-y", "y contains NaN"),
        ("lengths", "X has 10 rows but y has 9"),
        ("string-X", "not numbers"),
    ],
)
def test_data_stage_refuses_bad_data_and_keeps_the_last_good_splits(data_project, case, message):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(10, 3))
    y = {
        "strings": np.array(["cat", "dog"] * 5), "digit-strings": np.array(["1", "2"] * 5),
        "empty": np.zeros(0, dtype=np.int64), "one-row": np.array([1]), "nan-y": np.array([1.0] * 9 + [np.nan]),
        "lengths": np.arange(9) % 2, "string-X": np.arange(10) % 2,
    }[case]
    X = {"empty": np.zeros((0, 3)), "one-row": X[:1], "string-X": np.array([["a"] * 3] * 10)}.get(case, X)
    splits = data_project / "data/prepared/splits.npz"
    before = splits.read_bytes()
    proc = _stage_data(data_project, X, y)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert splits.read_bytes() == before


def test_string_labels_become_classes_when_asked(data_project, tmp_path):
    root = tmp_path / "proj"
    import shutil

    shutil.copytree(data_project, root)
    set_params(root, ["data.task=classification"])
    rng = np.random.default_rng(2)
    proc = _stage_data(root, rng.normal(size=(60, 3)), np.array(["dog", "cat", "emu"] * 20))
    assert proc.returncode == 0, proc.stderr
    out = json.loads((root / "reports/data.json").read_text())
    assert out["task"] == "classification" and out["n_classes"] == 3 and out["classes"] == ["cat", "dog", "emu"]


# ------------------------------------------------------------------ 8. the smaller ones


def test_predict_refuses_non_numeric_inputs(tmp_path):
    h = ModelHeader(spec={"arch": "mlp", "hidden": [4]}, input_shape=[3], out_features=2, task="classification")
    save_model(h.build(), tmp_path / "m.pt", h)
    np.save(tmp_path / "s.npy", np.array([["a", "b", "c"]]))
    result = runner.invoke(app, ["predict", str(tmp_path / "m.pt"), str(tmp_path / "s.npy")])
    assert result.exit_code == 2 and "not numbers" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_latin1_byte_in_params_is_named(tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"seed: 0\n# caf\xe9\n")
    result = runner.invoke(app, ["validate", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2 and "not UTF-8 text (byte 0xe9 on line 2)" in result.output


def test_validation_errors_are_capped(tmp_path):
    (tmp_path / "p.yaml").write_text("\n".join(f"k{i}: {i}" for i in range(20_000)))
    result = runner.invoke(app, ["validate", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2
    assert "and 19,980 more problems" in result.output and len(result.output) < 5_000


def test_written_files_follow_the_umask_and_keep_their_mode(tmp_path):
    from shrinkflow.config import apply_to_params_file
    from shrinkflow.io import write_text

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    params.chmod(0o640)
    apply_to_params_file(params, overrides=["prune.sparsity=0.5"])
    assert params.stat().st_mode & 0o777 == 0o640  # the user's file keeps its mode
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "new.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_loading_a_quantized_packed_model_prints_no_warning(tmp_path):
    from schemas.quantize import DynamicQuant
    from shrinkflow.methods import Env
    from shrinkflow.packing import pack_model
    from shrinkflow.quantization import QUANTIZERS

    h = ModelHeader(spec={"arch": "mlp", "hidden": [16]}, input_shape=[4], out_features=2, task="classification")
    q, qh = QUANTIZERS["dynamic"](h.build(), h, DynamicQuant(), Env())
    pack_model(q, qh, tmp_path / "q.sfz")
    save_model(q, tmp_path / "q.pt", qh)
    for name in ("q.sfz", "q.pt"):
        proc = subprocess.run([str(BIN / "python"), "-W", "always", "-c", f"import shrinkflow; shrinkflow.load({str(tmp_path / name)!r})"],
                              capture_output=True, text=True, env=project_env())
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr
