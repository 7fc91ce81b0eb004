"""Data sources and the prepared splits every stage reads.

The data stage turns a source into ``data/prepared/splits.npz``: float32 inputs
(images as [N, C, H, W], tables as [N, F]) and int64 labels (classification) or
float32 targets shaped [N, 1] (regression), split into train / val / test.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from schemas.params import (
    DataParams,
    DigitsData,
    MnistData,
    NpzData,
    SyntheticRegressionData,
)
from shrinkflow.errors import InputError
from shrinkflow.io import atomic_path

Task = Literal["classification", "regression"]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    task: Task

    @property
    def input_shape(self) -> list[int]:
        return list(self.X_train.shape[1:])

    @property
    def n_classes(self) -> int:
        if self.task == "regression":
            return 0
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def out_features(self) -> int:
        return self.n_classes if self.task == "classification" else int(self.y_train.shape[1])

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(getattr(self, f"X_{split}")), torch.from_numpy(getattr(self, f"y_{split}"))


def _split(X: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator, stratify: bool):
    """Hold out ``fraction`` of (X, y), stratified by class when asked."""
    n = len(X)
    if fraction <= 0:
        return (X, y), (X[:0], y[:0])
    if stratify:
        held = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            held.append(idx[: max(1, round(len(idx) * fraction))])
        held_idx = np.sort(np.concatenate(held))
    else:
        held_idx = np.sort(rng.permutation(n)[: max(1, round(n * fraction))])
    mask = np.zeros(n, dtype=bool)
    mask[held_idx] = True
    return (X[~mask], y[~mask]), (X[mask], y[mask])


def _read_idx(path: Path) -> np.ndarray:
    """Read one (gzipped) IDX file of the MNIST distribution."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{path}: truncated IDX file ({arr.size} values, header says {shape})")
    return arr.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"MNIST file {stem}(.gz) not found in {folder}: set data.path to the folder holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )


def _load_source(p: DataParams, seed: int, root: Path):
    """Return (X, y, X_test | None, y_test | None, task)."""
    if isinstance(p, DigitsData):
        from sklearn.datasets import load_digits

        d = load_digits()
        X = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        return X, d.target.astype(np.int64), None, None, "classification"
    if isinstance(p, MnistData):
        folder = root / p.path
        if not folder.is_dir():
            raise InputError(f"data.path {p.path!r} is not a folder: point it at the folder with the four MNIST IDX files")
        imgs = [_read_idx(_find(folder, f"{s}-images-idx3-ubyte")) for s in ("train", "t10k")]
        labels = [_read_idx(_find(folder, f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")]
        X, Xt = ((a.astype(np.float32) / 255.0)[:, None] for a in imgs)
        y, yt = (a.astype(np.int64) for a in labels)
        if p.train_limit:
            X, y = X[: p.train_limit], y[: p.train_limit]
        return X, y, Xt, yt, "classification"
    if isinstance(p, SyntheticRegressionData):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((p.n_samples, 10)).astype(np.float32)
        w1 = rng.standard_normal((10, 16)) / np.sqrt(10)
        w2 = rng.standard_normal((16, 1)) / 4.0
        y = (np.tanh(X @ w1) @ w2 + p.noise * rng.standard_normal((p.n_samples, 1))).astype(np.float32)
        return X, y, None, None, "regression"
    if isinstance(p, NpzData):
        path = root / p.path
        # A folder is a watched drop zone: every .npz in it, in name order, concatenated
        # (scheduled retraining picks up new batches dropped there).
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not files or not files[0].is_file():
            raise InputError(
                f"data.path {p.path!r}: no .npz found (data.source npz needs an .npz file, or a folder of them, with arrays X and y)"
            )
        parts = []
        for file in files:
            try:
                with np.load(file, allow_pickle=False) as z:
                    parts.append({k: z[k] for k in z.files})
            except Exception as exc:
                raise InputError(f"data.path {p.path!r}: {file.name} is not a readable .npz file: {exc}") from exc
            if parts[-1].keys() != parts[0].keys():
                raise InputError(f"data.path {p.path!r}: {file.name} holds {sorted(parts[-1])}, {files[0].name} holds {sorted(parts[0])}; use the same arrays in every file")
        arrays = {k: np.concatenate([a[k] for a in parts]) for k in parts[0]}
        missing = {"X", "y"} - arrays.keys()
        if missing:
            raise InputError(f"{p.path}: missing array(s) {sorted(missing)}; found {sorted(arrays)}")
        X, y = arrays["X"].astype(np.float32), arrays["y"]
        if len(X) != len(y):
            raise InputError(f"{p.path}: X has {len(X)} rows but y has {len(y)}")
        task: Task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
        Xt, yt = arrays.get("X_test"), arrays.get("y_test")
        if (Xt is None) != (yt is None):
            raise InputError(f"{p.path}: X_test and y_test must be given together")

        def fix_y(a: np.ndarray) -> np.ndarray:
            if task == "classification":
                if a.min() < 0:
                    raise InputError(f"{p.path}: class labels must be 0..K-1, found {a.min()}")
                return a.astype(np.int64).reshape(-1)
            return a.astype(np.float32).reshape(len(a), -1)

        y = fix_y(y)
        if Xt is not None:
            Xt, yt = Xt.astype(np.float32), fix_y(yt)
        if not np.isfinite(X).all():
            raise InputError(f"{p.path}: X contains NaN or infinite values")
        return X, y, Xt, yt, task
    raise InputError(f"unknown data source {p!r}")  # pragma: no cover - schema forbids it


def prepare(p: DataParams, seed: int, root: Path = Path(".")) -> Splits:
    """Load the source and split it reproducibly (``seed``); ``p.path`` is relative to ``root``."""
    X, y, Xt, yt, task = _load_source(p, seed, Path(root))
    rng = np.random.default_rng(seed)
    stratify = task == "classification"
    if Xt is None:
        (X, y), (Xt, yt) = _split(X, y, p.test_fraction, rng, stratify)
    (X, y), (Xv, yv) = _split(X, y, p.val_fraction, rng, stratify)
    return Splits(X, y, Xv, yv, Xt, yt, task)


def save_splits(s: Splits, path: Path) -> None:
    arrays = {f"{a}_{sp}": getattr(s, f"{a}_{sp}") for sp in SPLITS for a in ("X", "y")}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, task=np.array(s.task), **arrays)


def load_splits(path: Path) -> Splits:
    if not Path(path).is_file():
        raise InputError(f"prepared data not found at {path}: run the data stage first (dvc repro data)")
    with np.load(path, allow_pickle=False) as z:
        return Splits(**{k: z[k] for k in z.files if k != "task"}, task=str(z["task"]))
