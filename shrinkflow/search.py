"""Sweep search and results as pure code: the space, a trial's standing, the choice, the Pareto set.

No orchestration here (no Optuna, Dask or DVC): ``flows/ops/study.py`` turns the space
into Optuna distributions and the results back into rows; this module decides what a
result means. A sweep minimises its ``objective`` (file size or latency) among the trials
whose quality drop vs their own teacher meets the ``criterion``; the Pareto set is taken
over quality x size x latency.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from schemas.paths import STAGES
from schemas.sweep import Range, Sweep, TrialResult
from shrinkflow.report import quality_drop

#: Values an Optuna categorical choice (and a grid value) may hold as they are.
Primitive = None | bool | int | float | str


# ------------------------------------------------------------------ the space


def override_items(mapping: dict[str, Any]) -> list[str]:
    """``{"prune.sparsity": 0.9}`` → ``["prune.sparsity=0.9"]`` (JSON is valid YAML, so lists/dicts survive)."""
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def point_key(point: dict[str, Any]) -> str:
    """A point's identity: two proposals with the same key are the same config."""
    return json.dumps(point, sort_keys=True)


def space_values(space: dict[str, list[Any] | Range]) -> dict[str, list[Any]]:
    """Each key's discrete values: lists as written, ranges cut into ``steps`` values."""
    return {k: (v.values() if isinstance(v, Range) else list(v)) for k, v in space.items()}


def grid_points(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, first key varying slowest."""
    keys = list(values)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values[k] for k in keys))]


def space_size(space: dict[str, list[Any] | Range], mode: str) -> int | None:
    """How many distinct points the search can propose; None when a range is sampled continuously."""
    if mode != "grid" and any(isinstance(v, Range) for v in space.values()):
        return None
    return math.prod(len(v) for v in space_values(space).values())


def _primitive(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def encode_choices(values: list[Any]) -> list[Primitive]:
    """A key's values as Optuna can store them (None, bool, int, float, str).

    A list holding any list or mapping (e.g. model specs) is stored as JSON strings, all
    of it, so that ``"compressed"`` and ``{"arch": "mlp"}`` cannot collide.
    """
    if all(_primitive(v) for v in values):
        return list(values)
    return [json.dumps(v, sort_keys=True) for v in values]


def decode_choice(value: Primitive, values: list[Any]) -> Any:
    """The original value of an encoded choice of ``values``."""
    if all(_primitive(v) for v in values):
        return value
    return json.loads(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------ a trial's standing


def objective_column(objective: str) -> str:
    """metrics.json key a sweep objective minimises."""
    return "size_bytes" if objective == "size" else objective.replace("latency_b", "latency_ms_b")


def assess(result: TrialResult, sweep: Sweep) -> dict[str, Any]:
    """A trial's standing: quality drop vs its teacher, criterion met, objective value."""
    out: dict[str, Any] = {"point": result.point, "passed": False, "drop": math.inf, "objective_value": math.inf}
    if result.status != "done" or result.metrics is None or result.teacher is None:
        return out
    m, t = result.metrics, result.teacher
    drop = quality_drop(t.quality, m.quality, m.quality_key, sweep.criterion.relative)
    out.update(drop=drop, passed=drop <= sweep.criterion.max_drop, objective_value=float(m.get(objective_column(sweep.objective))))
    return out


def choose(results: Iterable[TrialResult], sweep: Sweep) -> TrialResult | None:
    """The passing trial with the smallest objective (ties: smaller drop, then lower trial number)."""
    best, best_key = None, None
    for r in results:
        a = assess(r, sweep)
        if not a["passed"]:
            continue
        key = (a["objective_value"], a["drop"], r.index)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def saved_seconds(pruned: TrialResult, finished: Iterable[TrialResult]) -> float | None:
    """What stopping ``pruned`` early saved: the median time each stage it skipped took in finished trials.

    Only stages that finished trials actually ran count (a stage restored from DVC's
    run-cache costs nothing); None when no finished trial ran any of them.
    """
    last = max((STAGES.index(s) for s in pruned.stage_seconds), default=STAGES.index("train_teacher"))
    skipped = STAGES[last + 1 :]
    done = [r for r in finished if r.status == "done"]
    per_stage = [[r.stage_seconds[s] for r in done if s in r.ran and s in r.stage_seconds] for s in skipped]
    known = [statistics.median(v) for v in per_stage if v]
    return round(sum(known), 2) if known else None


# ------------------------------------------------------------------ the Pareto set


def pareto_front(rows: Sequence[dict[str, Any]], objectives: dict[str, Literal["max", "min"]]) -> list[int]:
    """Indices of the rows no other row dominates (at least as good everywhere, better somewhere).

    Rows missing an objective or holding a non-finite value are never on the front.
    Identical rows do not dominate each other, so all copies stay.
    """
    sign = {k: (1.0 if d == "min" else -1.0) for k, d in objectives.items()}

    def vec(r: dict[str, Any]) -> list[float] | None:
        try:
            v = [sign[k] * float(r[k]) for k in objectives]
        except (KeyError, TypeError, ValueError):
            return None
        return v if all(math.isfinite(x) for x in v) else None

    vecs = [vec(r) for r in rows]
    front = []
    for i, a in enumerate(vecs):
        if a is None:
            continue
        dominated = any(
            b is not None and all(y <= x for x, y in zip(a, b, strict=True)) and any(y < x for x, y in zip(a, b, strict=True))
            for j, b in enumerate(vecs) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pareto_objectives(rows: Iterable[dict[str, Any]], sweep: Sweep) -> dict[str, Literal["max", "min"]]:
    """Quality (max accuracy / min MSE), file size and latency (the objective's batch size, else the smallest)."""
    rows = list(rows)
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    q = "accuracy" if "accuracy" in keys else "mse"
    lat = objective_column(sweep.objective) if sweep.objective != "size" else None
    if lat is None:
        lats = sorted((k for k in keys if k.startswith("latency_ms_b")), key=lambda k: int(k.removeprefix("latency_ms_b")))
        lat = lats[0] if lats else None
    objs: dict[str, Literal["max", "min"]] = {q: "max" if q == "accuracy" else "min", "size_bytes": "min"}
    if lat:
        objs[lat] = "min"
    return objs


# ------------------------------------------------------------------ tables and plots


def table_rows(results: Sequence[TrialResult], sweep: Sweep) -> list[dict[str, Any]]:
    """One flat row per trial: the point, status, the final model's metrics.json keys, drop, pass."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        a = assess(r, sweep)
        row: dict[str, Any] = {"trial": r.index, "status": r.status}
        # Lists and mappings (e.g. a student model spec) as JSON, so the CSV cell reads back.
        row.update({k: v if _primitive(v) else json.dumps(v) for k, v in r.point.items()})
        if r.metrics is not None:
            row.update(r.metrics.model_dump(exclude_none=True))
        if r.teacher is not None:
            row[f"teacher_{r.teacher.quality_key}"] = r.teacher.quality
        row.update(
            drop=a["drop"] if r.status == "done" else None,
            passed=a["passed"] if r.status == "done" else None,
            val_drops=json.dumps(r.val_drops) if r.val_drops else "",
            saved_seconds=r.saved_seconds,
            seconds=r.seconds, pid=r.pid, host=r.host, ran=" ".join(r.ran), reused=" ".join(r.reused), reason=r.reason or "",
        )
        rows.append(row)
    return rows


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, columns in order of first appearance."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(
    rows: list[dict[str, Any]], sweep: Sweep, chosen: TrialResult | None, front: list[int], elapsed: float, notes: Sequence[str] = ()
) -> str:
    """The results table (★ = Pareto set), the chosen trial, early stops and failures."""
    q = "accuracy" if any("accuracy" in r for r in rows) else "mse"
    lat = [c for c in pareto_objectives(rows, sweep) if c.startswith("latency_ms_b")]
    cols = ["trial", "status", *sweep.space, q, f"teacher_{q}", "drop", "passed", "size_bytes", "compression_ratio", *lat, "seconds"]
    on_front = {rows[i]["trial"] for i in front}
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "pruned", "failed", "skipped", "interrupted")}
    counts = ", ".join(f"{n} {s}" for s, n in count.items() if n or s == "done")
    mode = sweep.search.mode + (f" ({sweep.search.sampler})" if sweep.search.mode == "auto" else "")
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"Search: {mode} on Optuna; criterion: {q} drop ≤ {sweep.criterion.max_drop:g}"
        f"{' (relative)' if sweep.criterion.relative else ''} vs the trial's teacher; objective: minimise {sweep.objective}. "
        f"{len(rows)} trials in {elapsed:.0f} s ({counts}). ★ = on the Pareto frontier (quality vs size vs latency).",
        "",
        "| " + " | ".join(cols) + " |",
        "|---" * len(cols) + "|",
    ]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols]
        if r["trial"] in on_front:
            cells[0] += " ★"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if chosen is not None:
        lines += [f"**Chosen: trial {chosen.index}** {json.dumps(chosen.point)} → `best-params.yaml`", ""]
    else:
        lines += ["**No trial met the criterion**: nothing chosen (loosen `criterion.max_drop` or widen the space).", ""]
    pruned = [r for r in rows if r["status"] == "pruned"]
    if pruned:
        saved = [r["saved_seconds"] for r in pruned if r.get("saved_seconds") is not None]
        lines += [
            f"## Stopped early ({len(pruned)}; about {sum(saved):.0f} s saved)",
            "",
            *[f"- trial {r['trial']}: {r['reason']}" for r in pruned],
            "",
        ]
    failed = [r for r in rows if r["status"] in ("failed", "skipped", "interrupted")]
    if failed:
        lines += ["## Failed / skipped / interrupted", ""] + [f"- trial {r['trial']}: {r['reason']}" for r in failed] + [""]
    if notes:
        lines += [*notes, ""]
    return "\n".join(lines)


def plot_pareto(path: Path, rows: list[dict[str, Any]], front: list[int], objectives: dict[str, str], chosen_trial: int | None) -> None:
    """Quality vs size and quality vs latency: every trial, the Pareto set, each panel's 2-D frontier, the chosen one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, *xs = list(objectives)
    fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4.2), squeeze=False)
    done = [i for i, r in enumerate(rows) if r["status"] == "done"]
    for ax, x in zip(axes[0], xs, strict=True):
        ax.scatter([rows[i][x] for i in done], [rows[i][q] for i in done], c="0.6", label="trials")
        ax.scatter([rows[i][x] for i in front], [rows[i][q] for i in front], c="tab:red", label="Pareto set (all objectives)")
        # The frontier of this panel's two objectives alone, as a staircase.
        pair = pareto_front([rows[i] for i in done], {q: objectives[q], x: "min"})
        pts = sorted((rows[done[j]][x], rows[done[j]][q]) for j in pair)
        if len(pts) > 1:
            ax.step(*zip(*pts, strict=True), where="post", ls="--", c="tab:red", alpha=0.6, label=f"frontier ({q} vs {x})")
        for i in done:
            ax.annotate(str(rows[i]["trial"]), (rows[i][x], rows[i][q]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if chosen_trial is not None:
            c = next(r for r in rows if r["trial"] == chosen_trial)
            ax.scatter([c[x]], [c[q]], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="chosen")
        xv = [float(rows[i][x]) for i in done]
        if xv and min(xv) > 0 and max(xv) / min(xv) > 20:  # sizes can span orders of magnitude
            ax.set_xscale("log")
        ax.set_xlabel(x + (" (bytes)" if x == "size_bytes" else " (ms)"))
        ax.set_ylabel(q)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
