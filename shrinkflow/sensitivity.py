"""Sensitivity analysis: prune each layer alone at several sparsities, measure validation quality.

The table says which layers tolerate pruning (Han et al. 2015, Fig. 5): prune them
harder and the sensitive ones less. ``auto_allocate`` turns it into per-layer
sparsities that meet a global target.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from schemas.prune import MagnitudePrune
from shrinkflow.data import Splits
from shrinkflow.errors import InputError
from shrinkflow.io import write_json, write_text
from shrinkflow.masks import prunable
from shrinkflow.pruning.magnitude import MASKERS, layer_name
from shrinkflow.training import predict, quality

JSON, CURVES, MARKDOWN, PNG = "sensitivity.json", "curves.json", "sensitivity.md", "sensitivity.png"


def _val(splits: Splits):
    X, y = splits.tensors("val")
    if not len(X):
        raise InputError("sensitivity analysis measures validation quality: set data.val_fraction above 0")
    return X, y


def analyze(model: nn.Module, splits: Splits, sparsities: list[float], method: str = "magnitude") -> dict[str, Any]:
    """Prune each prunable layer alone (layer scope) at each sparsity; return the table.

    Returns:
        ``{"metric": "accuracy"|"mse", "baseline": q, "layers": {name: {"params": n,
        "quality": {sparsity: q}}}}`` (sparsity keys as strings, for JSON).
    """
    X, y = _val(splits)
    baseline = quality(predict(model, X), y, splits.task)
    table: dict[str, Any] = {}
    for key, w in prunable(model).items():
        name = layer_name(key)
        row: dict[str, float] = {}
        for s in sparsities:
            trial = copy.deepcopy(model)
            params = MagnitudePrune(sparsity=s, scope="layer", skip=[n for n in map(layer_name, prunable(trial)) if n != name])
            MASKERS[method](trial, params, 1.0)
            row[f"{s:g}"] = quality(predict(trial, X), y, splits.task)
        table[name] = {"params": int(w.numel()), "quality": row}
    return {"metric": "accuracy" if splits.task == "classification" else "mse", "baseline": baseline, "layers": table}


def _loss(table: dict[str, Any], name: str, s: float) -> float:
    """Quality lost by pruning ``name`` to ``s`` (linear between measured points, 0 at s = 0)."""
    points = sorted((float(k), v) for k, v in table["layers"][name]["quality"].items())
    xs = [0.0] + [p[0] for p in points]
    qs = [table["baseline"]] + [p[1] for p in points]
    sign = 1.0 if table["metric"] == "accuracy" else -1.0  # accuracy falls, MSE rises
    loss = sign * (table["baseline"] - np.interp(s, xs, qs))
    return float(max(0.0, loss))


def auto_allocate(table: dict[str, Any], target: float, layers: list[str] | None = None) -> dict[str, float]:
    """Per-layer sparsities meeting ``target`` over ``layers`` with the least sensitive pruned most.

    Every layer gets the largest sparsity whose (interpolated) quality loss stays
    within one shared budget; the budget is bisected until the parameter-weighted
    sparsity reaches ``target``. Sparsities are capped at the largest one measured.
    """
    names = layers if layers is not None else list(table["layers"])
    sizes = np.array([table["layers"][n]["params"] for n in names], dtype=float)
    cap = max(float(k) for n in names for k in table["layers"][n]["quality"])
    grid = np.round(np.arange(0.0, cap + 1e-9, 0.005), 4)
    losses = {n: np.array([_loss(table, n, s) for s in grid]) for n in names}

    def alloc(budget: float) -> np.ndarray:
        out = []
        for n in names:
            ok = np.nonzero(losses[n] <= budget)[0]
            # Largest grid sparsity before the loss first exceeds the budget.
            first_bad = np.nonzero(losses[n] > budget)[0]
            stop = first_bad[0] if len(first_bad) else len(grid)
            ok = ok[ok < stop]
            out.append(grid[ok[-1]] if len(ok) else 0.0)
        return np.array(out)

    lo, hi = 0.0, max(float(v.max()) for v in losses.values()) + 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        if float((alloc(mid) * sizes).sum() / sizes.sum()) >= target:
            hi = mid
        else:
            lo = mid
    s = alloc(hi)
    # Spread any excess evenly down so the total lands on the target, not above it.
    total = float((s * sizes).sum() / sizes.sum())
    if total > target > 0:
        s = s * (target / total)
    return {n: float(v) for n, v in zip(names, s, strict=True)}


def write_reports(table: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the table as JSON, a DVC plot file, markdown and a PNG; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sparsities = sorted({k for v in table["layers"].values() for k in v["quality"]}, key=float)
    write_json(out_dir / JSON, table)
    # One row per sparsity, one column per layer: `dvc plots show` draws one line per layer.
    write_json(
        out_dir / CURVES,
        [{"sparsity": float(s), **{n: v["quality"][s] for n, v in table["layers"].items()}} for s in sparsities],
    )
    metric = table["metric"]
    lines = [
        f"# Pruning sensitivity (validation {metric}; unpruned: {table['baseline']:.4f})",
        "",
        "Each layer pruned alone by weight magnitude; the others untouched.",
        "",
        "| layer | params | " + " | ".join(f"{float(s):.0%}" for s in sparsities) + " |",
        "|---|---:|" + "---:|" * len(sparsities),
    ]
    for n, v in table["layers"].items():
        lines.append(f"| {n} | {v['params']:,} | " + " | ".join(f"{v['quality'][s]:.4f}" for s in sparsities) + " |")
    write_text(out_dir / MARKDOWN, "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")  # no display in pipelines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [float(s) for s in sparsities]
    for n, v in table["layers"].items():
        ax.plot(xs, [v["quality"][s] for s in sparsities], marker="o", label=f"{n} ({v['params']:,})")
    ax.axhline(table["baseline"], color="gray", linestyle="--", label="unpruned")
    ax.set_xlabel("sparsity of the layer (others unpruned)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Pruning sensitivity per layer")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / PNG, dpi=100)
    plt.close(fig)
    return [out_dir / JSON, out_dir / CURVES, out_dir / MARKDOWN, out_dir / PNG]


def write_disabled(out_dir: Path) -> None:
    """Keep the (DVC-tracked) folder present and say how to enable the analysis."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (JSON, CURVES, PNG):
        (out_dir / name).unlink(missing_ok=True)
    write_text(out_dir / MARKDOWN, "Sensitivity analysis is off: set `prune.sensitivity: true` or run `shrinkflow sensitivity`.\n")

