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
    #: Names of the classes 0..K-1 when the labels were not integers (``data.task: classification``).
    classes: list[str] | None = None

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
    if fraction <= 0 or n == 0:
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


def _idx_header(path: Path) -> tuple[int, ...]:
    """The shape an IDX file announces (reads its first bytes only)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            zero, dtype, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
                raise InputError(f"{path}: not an unsigned-byte IDX file")
            return struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except (OSError, EOFError, struct.error) as exc:
        raise InputError(f"{path}: not a readable IDX file ({exc})") from None


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"MNIST file {stem}(.gz) not found in {folder}: set data.path to the folder holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )


def _npz_files(p: NpzData, root: Path) -> list[Path]:
    path = root / p.path
    # A folder is a watched drop zone: every .npz in it, in name order, concatenated
    # (scheduled retraining picks up new batches dropped there).
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise InputError(
            f"data.path {p.path!r}: no .npz found (data.source npz needs an .npz file, or a folder of them, with arrays X and y)"
        )
    return files


def _read_npz(p: NpzData, root: Path) -> dict[str, np.ndarray]:
    """Every file's arrays, concatenated; X and y must be there, the same arrays in every file."""
    parts = []
    files = _npz_files(p, root)
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        except Exception as exc:  # numpy raises several types for bad or pickled archives
            raise InputError(f"data.path {p.path!r}: {file.name} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
        if parts[-1].keys() != parts[0].keys():
            raise InputError(f"data.path {p.path!r}: {file.name} holds {sorted(parts[-1])}, {files[0].name} holds {sorted(parts[0])}; use the same arrays in every file")
    missing = {"X", "y"} - parts[0].keys()
    if missing:
        raise InputError(f"data.path {p.path!r}: missing array(s) {sorted(missing)}; found {sorted(parts[0])} (np.savez(path, X=..., y=...))")
    try:
        return {k: np.concatenate([a[k] for a in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
    except ValueError as exc:
        raise InputError(f"data.path {p.path!r}: the files' arrays do not fit together ({exc})") from None


def _features(X: np.ndarray, where: str) -> np.ndarray:
    """``X`` as float32 [rows, features...], refusing what cannot be inputs."""
    if X.ndim < 2:
        raise InputError(f"{where} is {X.ndim}-D, {list(X.shape)}: give one row per example, shaped [rows, features...] (X.reshape(-1, 1) for one feature)")
    if len(X) == 0:
        raise InputError(f"{where} has no rows")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise InputError(f"{where} holds {X.dtype} values, not numbers: encode the features as numbers first")
    X = X.astype(np.float32)
    if not np.isfinite(X).all():
        raise InputError(f"{where} contains NaN or infinite values: impute or drop those rows")
    return X


def _labels(y: np.ndarray, yt: np.ndarray | None, choice: str, where: str):
    """(y, y_test, task, class names | None) from the labels as stored and ``data.task``."""
    both = [a for a in (y, yt) if a is not None]
    numeric = all(np.issubdtype(a.dtype, np.number) for a in both)
    integer = all(np.issubdtype(a.dtype, np.integer) for a in both)
    if len(y) == 0:
        raise InputError(f"{where}: y has no rows")
    if choice == "auto":
        if not numeric:
            raise InputError(
                f"{where}: y holds {y.dtype} labels, neither integers (classification) nor floats (regression): "
                "set data.task: classification to use them as classes (numbered in sorted order), or convert y"
            )
        choice = "classification" if integer else "regression"
    if choice == "regression":
        if not numeric:
            raise InputError(f"{where}: data.task is regression but y holds {y.dtype} values: regression needs numbers")
        out = [a.astype(np.float32).reshape(len(a), -1) for a in both]
        if any(not np.isfinite(a).all() for a in out):
            raise InputError(f"{where}: y contains NaN or infinite values: drop or fix those rows")
        return out[0], (out[1] if yt is not None else None), "regression", None
    flat = [a.reshape(len(a), -1) for a in both]
    if any(a.shape[1] != 1 for a in flat):
        raise InputError(f"{where}: classification needs one label per row, y is shaped {list(y.shape)}")
    flat = [a.reshape(-1) for a in flat]
    if numeric and any(not np.isfinite(a.astype(np.float64)).all() for a in flat):
        raise InputError(f"{where}: y contains NaN or infinite values: drop or fix those rows")
    if numeric and all(np.array_equal(a, np.round(a)) for a in flat) and min(a.min() for a in flat) >= 0:
        return (flat[0].astype(np.int64), flat[1].astype(np.int64) if yt is not None else None, "classification", None)
    # Any other labels (strings, negative or fractional numbers): classes numbered in sorted order.
    values = np.unique(np.concatenate(flat if numeric else [a.astype(str) for a in flat]))
    coded = [np.searchsorted(values, a if numeric else a.astype(str)).astype(np.int64) for a in flat]
    names = [format(v, "g") if numeric else str(v) for v in values]
    return coded[0], (coded[1] if yt is not None else None), "classification", names


def check_source(p: DataParams, root: Path) -> list[str]:
    """What can be checked about the data files without loading them: present, readable, the arrays there."""
    if isinstance(p, NpzData):
        try:
            files = _npz_files(p, root)
        except InputError as exc:
            return [str(exc)]
        for file in files:
            try:
                with np.load(file, allow_pickle=False) as z:
                    names = set(z.files)
            except Exception as exc:  # numpy raises several types for bad archives
                return [f"data.path {p.path!r}: {file.name} is not a readable .npz file ({type(exc).__name__})"]
            if not {"X", "y"} <= names:
                return [f"data.path {p.path!r}: {file.name} lacks array(s) {sorted({'X', 'y'} - names)}; found {sorted(names)}"]
        return []
    if isinstance(p, MnistData):
        folder = root / p.path
        if not folder.is_dir():
            return [f"data.path {p.path!r} is not a folder: point it at the folder with the four MNIST IDX files"]
        try:
            for s in ("train", "t10k"):
                for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
                    _idx_header(_find(folder, f"{s}-{kind}"))
        except InputError as exc:
            return [str(exc)]
    return []


def _load_source(p: DataParams, seed: int, root: Path):
    """Return (X, y, X_test | None, y_test | None, task, class names | None)."""
    if isinstance(p, DigitsData):
        from sklearn.datasets import load_digits

        d = load_digits()
        X = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        return X, d.target.astype(np.int64), None, None, "classification", None
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
        return X, y, Xt, yt, "classification", None
    if isinstance(p, SyntheticRegressionData):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((p.n_samples, 10)).astype(np.float32)
        w1 = rng.standard_normal((10, 16)) / np.sqrt(10)
        w2 = rng.standard_normal((16, 1)) / 4.0
        y = (np.tanh(X @ w1) @ w2 + p.noise * rng.standard_normal((p.n_samples, 1))).astype(np.float32)
        return X, y, None, None, "regression", None
    if isinstance(p, NpzData):
        arrays = _read_npz(p, root)
        where = f"data.path {p.path!r}"
        X, y = arrays["X"], arrays["y"]
        Xt, yt = arrays.get("X_test"), arrays.get("y_test")
        if (Xt is None) != (yt is None):
            raise InputError(f"{where}: X_test and y_test must be given together")
        X = _features(X, f"{where}: X")
        if Xt is not None:
            Xt = _features(Xt, f"{where}: X_test")
            if Xt.shape[1:] != X.shape[1:]:
                raise InputError(f"{where}: X_test rows are shaped {list(Xt.shape[1:])}, X rows {list(X.shape[1:])}; they must match")
        for name, a, b in (("y", X, y), ("y_test", Xt, yt)):
            if b is not None and len(a) != len(b):
                raise InputError(f"{where}: {'X' if name == 'y' else 'X_test'} has {len(a)} rows but {name} has {len(b)}; give one label per row")
        y, yt, task, classes = _labels(y, yt, p.task, where)
        return X, y, Xt, yt, task, classes
    raise InputError(f"unknown data source {p!r}")  # pragma: no cover - schema forbids it


def prepare(p: DataParams, seed: int, root: Path = Path(".")) -> Splits:
    """Load the source and split it reproducibly (``seed``); ``p.path`` is relative to ``root``.

    Raises:
        InputError: the data cannot make the splits (too few rows, a class with no training
            row, NaN in the labels, ...), naming the problem and the fix.
    """
    X, y, Xt, yt, task, classes = _load_source(p, seed, Path(root))
    rng = np.random.default_rng(seed)
    stratify = task == "classification"
    if Xt is None:
        (X, y), (Xt, yt) = _split(X, y, p.test_fraction, rng, stratify)
    (X, y), (Xv, yv) = _split(X, y, p.val_fraction, rng, stratify)
    sizes = {"train": len(X), "val": len(Xv), "test": len(Xt)}
    empty = [k for k, n in sizes.items() if n == 0 and (k != "val" or p.val_fraction > 0)]
    if empty:
        raise InputError(
            f"data: {sum(sizes.values())} rows are too few for the splits (train {sizes['train']}, val {sizes['val']}, "
            f"test {sizes['test']}): {' and '.join(empty)} would be empty; give more rows, or lower "
            "data.val_fraction / data.test_fraction (val_fraction: 0 skips validation)"
        )
    if task == "classification":
        missing = sorted(set(np.unique(np.concatenate([y, yv, yt]))) - set(np.unique(y)))
        if missing:
            names = [classes[int(c)] if classes is not None else int(c) for c in missing]
            raise InputError(
                f"data: class(es) {names} have no training row after the split (too few rows of them); "
                "give more rows of those classes, or lower data.val_fraction / data.test_fraction"
            )
    return Splits(X, y, Xv, yv, Xt, yt, task, classes)


def save_splits(s: Splits, path: Path) -> None:
    arrays = {f"{a}_{sp}": getattr(s, f"{a}_{sp}") for sp in SPLITS for a in ("X", "y")}
    if s.classes is not None:
        arrays["classes"] = np.array(s.classes, dtype=str)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, task=np.array(s.task), **arrays)


def load_splits(path: Path) -> Splits:
    if not Path(path).is_file():
        raise InputError(f"prepared data not found at {path}: run the data stage first (dvc repro data)")
    with np.load(path, allow_pickle=False) as z:
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
        return Splits(**{k: z[k] for k in z.files if k not in ("task", "classes")}, task=str(z["task"]), classes=classes)
