"""What compression changed: where a variant differs from the teacher, beyond average accuracy.

Hooker et al. ("What Do Compressed Deep Neural Networks Forget?", 2019) show that pruning
and quantization hurt a few classes and examples far more than top-1 accuracy suggests.
This module measures that damage from the test-split outputs of each variant:

- classification: per-class accuracy and its change, the confusion difference, inputs
  newly wrong and newly right, expected calibration error (ECE, 15 equal-width bins as in
  Guo et al. 2017, "On Calibration of Modern Neural Networks") with a reliability
  diagram, agreement by teacher-confidence bucket, and a PNG grid of the most confident
  flips for image inputs;
- regression: error per target, error change by target quantile, and the inputs whose
  outputs changed most.

``analyze`` computes the typed report (``schemas.changes.ChangesReport``); ``write_reports``
writes it with the data files ``dvc plots`` draws and the pictures; ``render_summary``
prints it as markdown. torchmetrics has a binned calibration error, but it is one metric
and one more dependency; the reliability bins, flips and per-class tables need the
per-example predictions anyway, so all of it is computed here from them.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from schemas.changes import (
    Bin,
    Bucket,
    Chance,
    Changed,
    ChangesReport,
    ClassificationChanges,
    ClassRow,
    ConfusionCell,
    Flip,
    QuantileRow,
    RegressionChanges,
    TargetRow,
)
from shrinkflow.io import atomic_path, write_json, write_text

#: Reliability bins for ECE (equal width over confidence), the usual choice since Guo et al.
ECE_BINS = 15
#: Teacher-confidence buckets for agreement: trained networks put most inputs above 0.99,
#: so the top is split finely.
CONFIDENCE_EDGES = (0.0, 0.5, 0.7, 0.9, 0.99, 0.999, 1.0)
#: Quantile buckets of each regression target.
QUANTILES = 5
#: One-sided 99 % normal quantile: a teacher must beat chance by this many standard errors.
Z_99 = 2.326
#: Above this many classes the full confusion difference is neither stored nor drawn.
MAX_CONFUSION_CLASSES = 50
#: Changed confusion cells listed per variant.
CONFUSION_CELLS = 10
#: Classes drawn in the per-class picture (those that lost most, when there are more).
MAX_DRAWN_CLASSES = 30

#: Files written into the changes folder (dvc.yaml's plots name the same files).
CHANGES_JSON, SUMMARY_MD = "changes.json", "report.md"
DELTA_PLOT, PREDICTIONS_PLOT, CALIBRATION_PLOT = "delta.json", "predictions.json", "calibration.json"
IMAGES = "images"


def _mean_or_none(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


# --------------------------------------------------------------------- measures


def confidence_and_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest softmax probability and the predicted class of each row of ``logits``."""
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    return conf, pred


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> tuple[float, list[Bin]]:
    """Expected calibration error and its reliability diagram.

    Bin ``m`` holds the inputs with confidence in ``(m/bins, (m+1)/bins]``; ECE is the
    input-weighted mean of |accuracy - mean confidence| over the bins (Guo et al. 2017, eq. 3).

    Args:
        confidence: probability the model gives its prediction, shape [N].
        correct: whether that prediction is right, shape [N].
    """
    confidence = confidence.double()
    correct = correct.double()
    n = len(confidence)
    idx = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    rows, ece = [], 0.0
    for m in range(bins):
        sel = idx == m
        k = int(sel.sum())
        conf = _mean_or_none(confidence[sel])
        acc = _mean_or_none(correct[sel])
        if k:
            ece += k / n * abs(acc - conf)
        rows.append(Bin(lo=m / bins, hi=(m + 1) / bins, n=k, confidence=conf, accuracy=acc))
    return ece, rows


def confusion(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts of (actual, predicted) pairs: rows are the true class."""
    return torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _pair_counts(pred: torch.Tensor, y: torch.Tensor, k: int) -> dict[int, int]:
    """How many inputs have each (actual, predicted) pair, keyed ``actual * k + predicted``."""
    keys, counts = torch.unique(y * k + pred, return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist(), strict=True))


def chance(y: torch.Tensor, task: str, teacher_outputs: torch.Tensor) -> Chance:
    """The best constant predictor on the test split, and whether the teacher beats it.

    Classification: the majority class's share; the teacher must exceed it by ``Z_99``
    binomial standard errors. Regression: the variance of ``y`` (the MSE of predicting
    its mean); the teacher's MSE must stay below it by ``Z_99`` standard errors of the
    per-input difference of squared errors. Either way a teacher is flagged unless it
    beats chance at one-sided 99 % confidence.
    """
    n = len(y)
    if task == "classification":
        counts = torch.bincount(y, minlength=teacher_outputs.shape[1])
        major = int(counts.argmax())
        p0 = float(counts[major]) / n
        limit = p0 + Z_99 * math.sqrt(p0 * (1 - p0) / n)
        acc = float((teacher_outputs.argmax(1) == y).double().mean())
        return Chance(
            metric="accuracy", baseline=p0, limit=limit, teacher=acc, passed=acc > limit,
            detail=f"majority class {major}: {int(counts[major])} of {n} test inputs",
        )
    yd = y.double()
    sq_teacher = ((teacher_outputs.double() - yd) ** 2).mean(1)
    sq_mean = ((yd - yd.mean(0)) ** 2).mean(1)
    var = float(sq_mean.mean())
    diff = sq_teacher - sq_mean
    se = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    limit = var - Z_99 * se
    mse = float(sq_teacher.mean())
    return Chance(
        metric="mse", baseline=var, limit=limit, teacher=mse, passed=mse < limit,
        detail=f"MSE of predicting the mean of y, {n} test inputs",
    )


def classification_changes(
    reference: torch.Tensor, outputs: torch.Tensor, y: torch.Tensor, examples: int, ref_ece: float | None = None
) -> ClassificationChanges:
    """How ``outputs`` differ from the ``reference`` (teacher) outputs on labels ``y``."""
    k = outputs.shape[1]
    t_conf, t_pred = confidence_and_prediction(reference)
    v_conf, v_pred = confidence_and_prediction(outputs)
    t_ok, v_ok = t_pred == y, v_pred == y
    ece, bins = reliability(v_conf, v_ok)
    ref_ece = reliability(t_conf, t_ok)[0] if ref_ece is None else ref_ece

    n_c = torch.bincount(y, minlength=k)
    right_t, right_v = torch.bincount(y[t_ok], minlength=k), torch.bincount(y[v_ok], minlength=k)
    per_class = []
    for c, (n, rt, rv) in enumerate(zip(n_c.tolist(), right_t.tolist(), right_v.tolist(), strict=True)):
        ta, va = (rt / n, rv / n) if n else (None, None)
        per_class.append(ClassRow(label=c, n=n, teacher_accuracy=ta, accuracy=va, delta=None if n == 0 else va - ta))
    drops = sorted((r.delta, r.label) for r in per_class if r.delta is not None and r.delta < 0)
    worst_drop, worst = (-drops[0][0], drops[0][1]) if drops else (0.0, None)

    # Confusion cells by (actual, predicted) key, counted sparsely: a K x K matrix is only built for small K.
    c_t, c_v = _pair_counts(t_pred, y, k), _pair_counts(v_pred, y, k)
    changed = [key for key in c_t.keys() | c_v.keys() if c_t.get(key, 0) != c_v.get(key, 0) and key // k != key % k]
    changed.sort(key=lambda key: (-abs(c_v.get(key, 0) - c_t.get(key, 0)), key))
    cells = [
        ConfusionCell(actual=key // k, predicted=key % k, teacher=c_t.get(key, 0), variant=c_v.get(key, 0),
                      delta=c_v.get(key, 0) - c_t.get(key, 0))
        for key in changed[:CONFUSION_CELLS]
    ]
    delta = None
    if k <= MAX_CONFUSION_CLASSES:
        delta = (confusion(v_pred, y, k) - confusion(t_pred, y, k)).tolist()

    buckets = []
    edges = CONFIDENCE_EDGES
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (t_conf > lo) & (t_conf <= hi)
        buckets.append(Bucket(
            lo=lo, hi=hi, n=int(sel.sum()), agreement=_mean_or_none(v_pred[sel] == t_pred[sel]),
            teacher_accuracy=_mean_or_none(t_ok[sel]), accuracy=_mean_or_none(v_ok[sel]),
        ))

    flipped = torch.nonzero(v_pred != t_pred).flatten().numpy()
    # Most confident first: the variant says something else and is sure of it (then the teacher's confidence, then the row).
    order = np.lexsort((flipped, -t_conf.numpy()[flipped], -v_conf.numpy()[flipped]))
    flips = []
    for i in flipped[order][:examples].tolist():
        kind = "newly_wrong" if t_ok[i] else "newly_right" if v_ok[i] else "both_wrong"
        flips.append(Flip(
            index=i, label=int(y[i]), teacher=int(t_pred[i]), teacher_confidence=float(t_conf[i]),
            variant=int(v_pred[i]), variant_confidence=float(v_conf[i]), kind=kind,
        ))
    return ClassificationChanges(
        accuracy=float(v_ok.double().mean()),
        agreement=float((v_pred == t_pred).double().mean()),
        ece=ece,
        ece_change=ece - ref_ece,
        newly_wrong=int((t_ok & ~v_ok).sum()),
        newly_right=int((~t_ok & v_ok).sum()),
        both_wrong_changed=int((~t_ok & ~v_ok & (t_pred != v_pred)).sum()),
        worst_class=worst,
        worst_class_drop=worst_drop,
        per_class=per_class,
        confusion_changes=cells,
        confusion_delta=delta,
        reliability=bins,
        by_teacher_confidence=buckets,
        flips=flips,
        flip_grid=None,
    )


def _quantile_buckets(values: torch.Tensor) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Bucket index (0..QUANTILES-1) of each value by the values' own quantiles, and the bucket bounds."""
    v = values.double().numpy()
    edges = np.quantile(v, np.linspace(0, 1, QUANTILES + 1))
    # Right-closed buckets; the lowest value falls in the first.
    idx = np.clip(np.searchsorted(edges, v, side="left") - 1, 0, QUANTILES - 1)
    return torch.from_numpy(idx), [(float(edges[q]), float(edges[q + 1])) for q in range(QUANTILES)]


def regression_changes(reference: torch.Tensor, outputs: torch.Tensor, y: torch.Tensor, examples: int) -> RegressionChanges:
    """How ``outputs`` differ from the ``reference`` (teacher) outputs on targets ``y``."""
    ref, out, yd = reference.double(), outputs.double(), y.double()
    sq_t, sq_v = (ref - yd) ** 2, (out - yd) ** 2
    per_target = [
        TargetRow(target=j, teacher_mse=float(sq_t[:, j].mean()), mse=float(sq_v[:, j].mean()), delta=float(sq_v[:, j].mean() - sq_t[:, j].mean()))
        for j in range(y.shape[1])
    ]
    by_quantile = []
    for j in range(y.shape[1]):
        idx, bounds = _quantile_buckets(yd[:, j])
        for q, (lo, hi) in enumerate(bounds):
            sel = idx == q
            tm, vm = _mean_or_none(sq_t[sel, j]), _mean_or_none(sq_v[sel, j])
            by_quantile.append(QuantileRow(
                target=j, quantile=q + 1, lo=lo, hi=hi, n=int(sel.sum()), teacher_mse=tm, mse=vm,
                delta=None if tm is None else vm - tm,
            ))
    change = (out - ref).norm(dim=1)
    order = np.lexsort((np.arange(len(y)), -change.numpy()))[:examples].tolist()
    worst = [
        Changed(
            index=i, y=yd[i].tolist(), teacher=ref[i].tolist(), variant=out[i].tolist(), change=float(change[i]),
            teacher_error=float(sq_t[i].mean()), error=float(sq_v[i].mean()),
        )
        for i in order
        if float(change[i]) > 0
    ]
    return RegressionChanges(
        mse=float(sq_v.mean()), mse_change=float(sq_v.mean() - sq_t.mean()), agreement=float(((out - ref) ** 2).mean()),
        per_target=per_target, by_quantile=by_quantile, worst=worst,
    )


def analyze(
    outputs: Mapping[str, torch.Tensor], y: torch.Tensor, task: str, *, reference: str = "teacher", examples: int = 16,
    classes: list[str] | None = None,
) -> ChangesReport:
    """Every variant's outputs on the test split against the ``reference`` variant's.

    Args:
        outputs: test-split outputs (logits, or regression outputs) of each variant, by name.
        y: test labels (classification) or targets shaped [N, T] (regression).
        task: ``classification`` or ``regression``.
        examples: how many flips (or most-changed inputs) each variant lists.
        classes: names of the classes, when the labels had names.
    """
    ref = outputs[reference]
    variants = {}
    if task == "classification":
        t_conf, t_pred = confidence_and_prediction(ref)
        ref_ece = reliability(t_conf, t_pred == y)[0]
        for name, out in outputs.items():
            variants[name] = classification_changes(ref, out, y, examples, ref_ece=ref_ece)
    else:
        for name, out in outputs.items():
            variants[name] = regression_changes(ref, out, y, examples)
    return ChangesReport(
        task=task, n_test=len(y), reference=reference, classes=classes, chance=chance(y, task, ref), variants=variants
    )


# ----------------------------------------------------------------------- files


def is_image_batch(X: torch.Tensor) -> bool:
    """[N, H, W] or [N, C, H, W] with 1 or 3 channels: inputs that can be drawn."""
    return X.dim() == 3 or (X.dim() == 4 and X.shape[1] in (1, 3))


def _tile(x: torch.Tensor) -> np.ndarray:
    """One input as an image in [0, 1] (H, W) or (H, W, 3), scaled by its own range."""
    a = x.detach().double().numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


#: Flip-grid geometry in pixels (at GRID_DPI): each cell is a label band above a square image.
GRID_DPI, GRID_CELL_W, GRID_CELL_H, GRID_IMAGE, GRID_MARGIN, GRID_TITLE = 100, 160, 210, 140, 10, 40


def grid_layout(n: int) -> tuple[int, int]:
    """(rows, columns) of a flip grid with ``n`` tiles: at most 8 per row."""
    cols = max(1, min(n, 8))
    return max(1, math.ceil(n / cols)), cols


def tile_box(i: int, n: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of tile ``i``'s image in a grid of ``n`` tiles."""
    _, cols = grid_layout(n)
    r, c = divmod(i, cols)
    left = c * GRID_CELL_W + GRID_MARGIN
    top = GRID_TITLE + r * GRID_CELL_H + (GRID_CELL_H - GRID_IMAGE - GRID_MARGIN)
    return left, top, left + GRID_IMAGE, top + GRID_IMAGE


def flip_label(f: Flip, variant: str, name: Callable[[int], str] = str) -> str:
    """The text drawn above a flip's tile (``name`` shows a class)."""
    return (
        f"#{f.index} label {name(f.label)}\nteacher {name(f.teacher)} ({f.teacher_confidence:.2f})\n"
        f"{variant} {name(f.variant)} ({f.variant_confidence:.2f})"
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display in pipelines
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=GRID_DPI, metadata=metadata)
    _plt().close(fig)


def draw_flip_grid(
    X: torch.Tensor, flips: list[Flip], variant: str, n_flips: int, path: Path, name: Callable[[int], str] = str
) -> list[str]:
    """Draw ``flips`` as a PNG grid, each tile labelled with the true class and both predictions.

    The geometry is fixed (``tile_box``) and the labels are also stored in the PNG's
    ``Description`` text chunk, one tile per line, so the file can be checked.

    Returns:
        The labels drawn, in tile order.
    """
    plt = _plt()
    n = len(flips)
    rows, cols = grid_layout(n)
    width, height = cols * GRID_CELL_W, GRID_TITLE + rows * GRID_CELL_H
    fig = plt.figure(figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI)
    which = f"all {n} flips" if n == n_flips else f"the {n} most confident of {n_flips} flips"
    fig.text(0.5, 1 - 6 / height, f"{variant} vs teacher: {which} (input, true label, both predictions)", ha="center", va="top", fontsize=10)
    colors = {"newly_wrong": "#c0392b", "newly_right": "#1e8449", "both_wrong": "#555555"}
    for x, (kind, color) in zip((0.3, 0.5, 0.7), colors.items(), strict=True):
        fig.text(x, 1 - 24 / height, kind.replace("_", " "), color=color, ha="center", va="top", fontsize=8)
    labels = []
    for i, f in enumerate(flips):
        left, top, right, bottom = tile_box(i, n)
        ax = fig.add_axes((left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height))
        img = _tile(X[f.index])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colors[f.kind])
        label = flip_label(f, variant, name)
        labels.append(label)
        ax.set_title(label, fontsize=7.5, color=colors[f.kind], pad=3, linespacing=1.15)
    _save(fig, path, {"Description": "\n".join(s.replace("\n", " | ") for s in labels)})
    return labels


def _variants_but(report: ChangesReport) -> list[str]:
    return [v for v in report.variants if v != report.reference]


def _draw_per_class(report: ChangesReport, path: Path) -> None:
    plt = _plt()
    names = _variants_but(report)
    first = report.variants[report.reference]
    classes = [r.label for r in first.per_class if r.n]
    title = f"Which classes paid ({report.n_test:,} test inputs)"
    if len(classes) > MAX_DRAWN_CLASSES:  # keep the bars readable: the classes that lost most
        loss = {c: min(report.variants[n].per_class[c].delta for n in names) for c in classes} if names else {}
        classes = sorted(sorted(classes, key=lambda c: (loss.get(c, 0.0), c))[:MAX_DRAWN_CLASSES])
        title = f"The {MAX_DRAWN_CLASSES} classes that lost most ({report.n_test:,} test inputs)"
    fig, ax = plt.subplots(figsize=(min(20, max(6, 0.25 * len(classes) * max(1, len(names)) + 2)), 3.6))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        rows = {r.label: r for r in report.variants[name].per_class}
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(classes))]
        ax.bar(xs, [100 * rows[c].delta for c in classes], width=width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(classes)), [report.name(c) for c in classes], rotation=0 if report.classes is None else 30)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy change vs teacher (pp)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _draw_reliability(report: ChangesReport, path: Path) -> None:
    plt = _plt()
    names = list(report.variants)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ch = report.variants[name]
        centers = [(b.lo + b.hi) / 2 for b in ch.reliability]
        acc = [b.accuracy if b.accuracy is not None else 0.0 for b in ch.reliability]
        ax.bar(centers, acc, width=1 / ECE_BINS, edgecolor="black", linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {100 * ch.ece:.2f} %", fontsize=9)
        ax.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy in bin")
    axes[0][0].legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _draw_confusion_delta(report: ChangesReport, path: Path) -> bool:
    plt = _plt()
    names = [n for n in _variants_but(report) if report.variants[n].confusion_delta is not None]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        d = np.array(report.variants[name].confusion_delta)
        # Scaled by the off-diagonal cells (the confusions); the diagonal just saturates.
        lim = max(1, int(np.abs(d - np.diag(np.diag(d))).max()))
        ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim)
        if len(d) <= 12:
            for (a, p), v in np.ndenumerate(d):
                if v:
                    ax.text(p, a, f"{v:+d}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{name} - teacher", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    fig.suptitle("Confusion difference (test inputs)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _draw_quantiles(report: ChangesReport, path: Path) -> None:
    plt = _plt()
    names = _variants_but(report)
    first = report.variants[report.reference]
    groups = [_quantile_group(r, len(first.per_target)) for r in first.by_quantile]
    fig, ax = plt.subplots(figsize=(min(20, max(6, 0.25 * len(groups) * max(1, len(names)) + 2)), 3.6))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [r.delta or 0.0 for r in report.variants[name].by_quantile], width=width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("MSE change vs teacher")
    ax.set_title("Error change by target quantile")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _quantile_group(r: QuantileRow, n_targets: int) -> str:
    name = f"q{r.quantile} (≤ {r.hi:.3g})"
    return f"y{r.target} {name}" if n_targets > 1 else name


def write_reports(report: ChangesReport, outputs: Mapping[str, torch.Tensor], y: torch.Tensor, X: torch.Tensor, folder: Path, root: Path) -> ChangesReport:
    """Write the report, its plot data and its pictures into ``folder``; return the report with the pictures' paths.

    Files (every one always exists, empty where the task has no such plot, so that
    ``dvc plots`` finds them whatever the task):

    - ``changes.json``: the typed report; ``report.md``: its summary;
    - ``delta.json``: per class (or target quantile), each variant's quality change
      (accuracy in pp, or MSE) — ``dvc plots`` draws it as bars;
    - ``predictions.json``: per test input, the true class and each variant's
      prediction — the confusion matrices;
    - ``calibration.json``: per confidence bin, each variant's accuracy — the reliability diagram;
    - ``images/``: per_class.png, reliability.png, confusion_delta.png, flips_<variant>.png
      (classification), error_by_quantile.png (regression).
    """
    folder = Path(folder)
    images = folder / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):  # a variant that no longer flips must not keep an old grid
        old.unlink()

    def rel(p: Path) -> str:
        return p.resolve().relative_to(Path(root).resolve()).as_posix()

    names = _variants_but(report)
    written: dict[str, str] = {}
    variants = dict(report.variants)
    if report.task == "classification":
        t_pred = outputs[report.reference].argmax(1)
        rows = []
        for r in report.variants[report.reference].per_class:
            if r.n:
                rows.append({"group": report.name(r.label), **{n: 100 * report.variants[n].per_class[r.label].delta for n in names}})
        write_json(folder / DELTA_PLOT, rows)
        lab = (lambda c: c) if report.classes is None else report.name  # noqa: E731 - names when the data has them
        preds = {n: [lab(c) for c in outputs[n].argmax(1).tolist()] for n in report.variants}
        rows = [{"actual": lab(int(y[i])), **{n: preds[n][i] for n in report.variants}} for i in range(len(y))]
        # One row per test input: compact, it is the largest file of the report (git holds it, cache: false).
        write_text(folder / PREDICTIONS_PLOT, json.dumps(rows, separators=(",", ":")) + "\n")
        write_json(folder / CALIBRATION_PLOT, [
            {"confidence": (b.lo + b.hi) / 2, "ideal": (b.lo + b.hi) / 2,
             **{n: report.variants[n].reliability[m].accuracy for n in report.variants}}
            for m, b in enumerate(report.variants[report.reference].reliability)
        ])
        _draw_per_class(report, images / "per_class.png")
        written["per_class"] = rel(images / "per_class.png")
        _draw_reliability(report, images / "reliability.png")
        written["reliability"] = rel(images / "reliability.png")
        if _draw_confusion_delta(report, images / "confusion_delta.png"):
            written["confusion_delta"] = rel(images / "confusion_delta.png")
        if is_image_batch(X):
            for n in names:
                ch = report.variants[n]
                if ch.flips:
                    path = images / f"flips_{n}.png"
                    n_flips = int((outputs[n].argmax(1) != t_pred).sum())
                    draw_flip_grid(X, ch.flips, n, n_flips, path, report.name)
                    written[f"flips_{n}"] = rel(path)
                    variants[n] = ch.model_copy(update={"flip_grid": rel(path)})
    else:
        n_targets = y.shape[1]
        first = report.variants[report.reference]
        write_json(folder / DELTA_PLOT, [
            {"group": _quantile_group(r, n_targets), **{n: report.variants[n].by_quantile[i].delta for n in names}}
            for i, r in enumerate(first.by_quantile)
        ])
        write_json(folder / PREDICTIONS_PLOT, [])
        write_json(folder / CALIBRATION_PLOT, [])
        _draw_quantiles(report, images / "error_by_quantile.png")
        written["error_by_quantile"] = rel(images / "error_by_quantile.png")
    report = report.model_copy(update={"images": written, "variants": variants})
    write_json(folder / CHANGES_JSON, report.model_dump(mode="json"))
    here = rel(folder)
    write_text(folder / SUMMARY_MD, render_summary(report, link=lambda p: posixpath.relpath(p, here)) + "\n")
    return report


# ---------------------------------------------------------------------- markdown


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.2f} pp"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _vec(v: list[float]) -> str:
    return ", ".join(f"{x:.4g}" for x in v)


def render_summary(report: ChangesReport, variant: str | None = None, link: Callable[[str], str] = str) -> str:
    """The report as markdown: every variant side by side, or one ``variant`` in detail.

    ``link`` turns a picture's path (relative to the project root) into the link written.
    """
    if variant is not None:
        return _render_variant(report, variant, link)
    ch = report.chance
    verdict = "beats chance" if ch.passed else "**is no better than chance**"
    lines = [
        f"## What compression changed (vs the {report.reference}, {report.n_test:,} test inputs)",
        "",
        f"Chance: {ch.metric} {ch.baseline:.4g} ({ch.detail}); the {report.reference}'s {ch.metric} "
        f"{ch.teacher:.4g} {verdict} (limit {ch.limit:.4g}).",
        "",
    ]
    if report.task == "classification":
        lines += [
            "| variant | accuracy | ECE | ECE change | agreement | newly wrong | newly right | worst class |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, c in report.variants.items():
            worst = f"{report.name(c.worst_class)} ({_pp(-c.worst_class_drop)})" if c.worst_class is not None else "–"
            change = "–" if name == report.reference else _pp(c.ece_change)
            lines.append(
                f"| {name} | {_pct(c.accuracy)} | {_pct(c.ece)} | {change} | {_pct(c.agreement)} | "
                f"{c.newly_wrong:,} | {c.newly_right:,} | {worst} |"
            )
        names = _variants_but(report)
        ref = report.variants[report.reference]
        lines += ["", f"Accuracy per class (the {report.reference}'s, then each variant's change):", "",
                  "| class | n | " + report.reference + " | " + " | ".join(names) + " |",
                  "|---" * (3 + len(names)) + "|"]
        for r in ref.per_class:
            if r.n:
                cells = [_pp(report.variants[n].per_class[r.label].delta) for n in names]
                lines.append(f"| {report.name(r.label)} | {r.n:,} | {_pct(r.teacher_accuracy)} | " + " | ".join(cells) + " |")
    else:
        lines += ["| variant | MSE | MSE change | MSE to the teacher | largest output change |", "|---|---|---|---|---|"]
        for name, c in report.variants.items():
            biggest = _g(c.worst[0].change) if c.worst else "–"
            change = "–" if name == report.reference else f"{c.mse_change:+.4g}"
            lines.append(f"| {name} | {c.mse:.4g} | {change} | {c.agreement:.4g} | {biggest} |")
    if report.images:
        lines += ["", "Pictures: " + ", ".join(f"[{k}]({link(v)})" for k, v in report.images.items())]
    return "\n".join(lines)


def _render_variant(report: ChangesReport, variant: str, link: Callable[[str], str]) -> str:
    c = report.variants[variant]
    ref, nm = report.reference, report.name
    lines = [f"## {variant} vs the {ref} ({report.n_test:,} test inputs)", ""]
    if c.task == "classification":
        lines += [
            f"Accuracy {_pct(c.accuracy)}, agreement with the {ref} {_pct(c.agreement)}; "
            f"newly wrong {c.newly_wrong:,}, newly right {c.newly_right:,}, both wrong but changed {c.both_wrong_changed:,}.",
            f"ECE (15 bins) {_pct(c.ece)} ({_pp(c.ece_change)} vs the {ref}).",
            "",
            "Per class, worst first:",
            "",
            f"| class | n | {ref} | {variant} | change |",
            "|---|---|---|---|---|",
        ]
        rows = sorted((r for r in c.per_class if r.n), key=lambda r: (r.delta, r.label))
        lines += [f"| {nm(r.label)} | {r.n:,} | {_pct(r.teacher_accuracy)} | {_pct(r.accuracy)} | {_pp(r.delta)} |" for r in rows]
        if c.confusion_changes:
            lines += ["", "Confusions that changed most (actual → predicted):", "",
                      f"| actual | predicted | {ref} | {variant} | change |", "|---|---|---|---|---|"]
            lines += [f"| {nm(x.actual)} | {nm(x.predicted)} | {x.teacher} | {x.variant} | {x.delta:+d} |" for x in c.confusion_changes]
        lines += ["", f"Agreement by the {ref}'s confidence:", "",
                  f"| {ref} confidence | n | agreement | {ref} accuracy | {variant} accuracy |", "|---|---|---|---|---|"]
        lines += [
            f"| ({b.lo:g}, {b.hi:g}] | {b.n:,} | {_pct(b.agreement)} | {_pct(b.teacher_accuracy)} | {_pct(b.accuracy)} |"
            for b in c.by_teacher_confidence
        ]
        if c.flips:
            lines += ["", "Most confident flips:", "", f"| input | label | {ref} | {variant} | kind |", "|---|---|---|---|---|"]
            lines += [
                f"| #{f.index} | {nm(f.label)} | {nm(f.teacher)} ({f.teacher_confidence:.2f}) | {nm(f.variant)} ({f.variant_confidence:.2f}) | "
                f"{f.kind.replace('_', ' ')} |"
                for f in c.flips
            ]
        if c.flip_grid:
            lines += ["", f"Flip grid: [{Path(c.flip_grid).name}]({link(c.flip_grid)})"]
    else:
        lines += [f"MSE {c.mse:.4g} ({c.mse_change:+.4g} vs the {ref}); MSE to the {ref}'s outputs {c.agreement:.4g}.", "",
                  f"| target | {ref} MSE | {variant} MSE | change |", "|---|---|---|---|"]
        lines += [f"| y{t.target} | {t.teacher_mse:.4g} | {t.mse:.4g} | {t.delta:+.4g} |" for t in c.per_target]
        lines += ["", "Error change by target quantile:", "",
                  f"| target | quantile | range | n | {ref} MSE | {variant} MSE | change |", "|---|---|---|---|---|---|---|"]
        lines += [
            f"| y{q.target} | q{q.quantile} | ({q.lo:.3g}, {q.hi:.3g}] | {q.n:,} | {_g(q.teacher_mse)} | {_g(q.mse)} | "
            f"{'–' if q.delta is None else f'{q.delta:+.4g}'} |"
            for q in c.by_quantile
        ]
        if c.worst:
            lines += ["", "Inputs whose outputs changed most:", "", f"| input | y | {ref} | {variant} | change |", "|---|---|---|---|---|"]
            lines += [f"| #{w.index} | {_vec(w.y)} | {_vec(w.teacher)} | {_vec(w.variant)} | {w.change:.4g} |" for w in c.worst]
    return "\n".join(lines)
