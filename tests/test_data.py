"""Data sources and splits."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from schemas.data import DigitsData, MnistData, NpzData, SyntheticRegressionData
from shrinkflow.data import load_splits, prepare, save_splits
from shrinkflow.errors import InputError


def write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_digits_splits_are_disjoint_stratified_and_reproducible():
    a = prepare(DigitsData(), seed=1)
    b = prepare(DigitsData(), seed=1)
    assert a.input_shape == [1, 8, 8] and a.n_classes == 10 and a.task == "classification"
    assert len(a.X_train) + len(a.X_val) + len(a.X_test) == 1797
    assert abs(len(a.X_test) / 1797 - 0.2) < 0.01
    assert np.array_equal(a.X_test, b.X_test)
    assert set(np.unique(a.y_val)) == set(range(10))
    assert 0.0 <= a.X_train.min() and a.X_train.max() <= 1.0


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    s = prepare(MnistData(source="mnist", path=str(tmp_path), val_fraction=0.2), seed=0, root=tmp_path)
    assert s.input_shape == [1, 28, 28] and len(s.X_test) == 20 and len(s.X_train) + len(s.X_val) == 50
    assert s.X_train.max() <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte"):
        prepare(MnistData(source="mnist", path=str(tmp_path)), seed=0, root=tmp_path)


def test_npz_source_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", X=rng.normal(size=(100, 4)), y=rng.integers(0, 3, 100))
    s = prepare(NpzData(source="npz", path="ok.npz"), seed=0, root=tmp_path)
    assert s.task == "classification" and s.input_shape == [4]
    np.savez(tmp_path / "reg.npz", X=rng.normal(size=(100, 4)), y=rng.normal(size=100))
    assert prepare(NpzData(source="npz", path="reg.npz"), seed=0, root=tmp_path).task == "regression"
    np.savez(tmp_path / "bad.npz", X=rng.normal(size=(10, 4)), y=rng.integers(0, 3, 9))
    with pytest.raises(InputError, match="X has 10 rows but y has 9"):
        prepare(NpzData(source="npz", path="bad.npz"), seed=0, root=tmp_path)
    np.savez(tmp_path / "noy.npz", X=rng.normal(size=(10, 4)))
    with pytest.raises(InputError, match="missing array"):
        prepare(NpzData(source="npz", path="noy.npz"), seed=0, root=tmp_path)


def test_splits_file_round_trip(tmp_path):
    s = prepare(SyntheticRegressionData(source="synthetic-regression", n_samples=200), seed=3)
    save_splits(s, tmp_path / "s.npz")
    t = load_splits(tmp_path / "s.npz")
    assert t.task == "regression" and t.out_features == 1
    assert np.array_equal(s.X_test, t.X_test) and np.array_equal(s.y_train, t.y_train)
