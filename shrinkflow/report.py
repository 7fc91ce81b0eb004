"""Reading reports/metrics.json (``schemas.metrics.Metrics``): quality drops and the variants table."""

from __future__ import annotations

from schemas.metrics import Metrics


def quality_drop(teacher: float, final: float, key: str, relative: bool = False) -> float:
    """Quality lost vs the teacher: accuracy points lost, or MSE gained; relative divides by the teacher's."""
    drop = teacher - final if key == "accuracy" else final - teacher
    return drop / max(abs(teacher), 1e-12) if relative else drop


def render_table(metrics: Metrics) -> str:
    """A markdown table of metrics.json (printed by ``shrinkflow metrics`` and ``shrinkflow run``)."""
    first = next(iter(metrics.root.values()))
    cols = [metrics.quality_key, "agreement", "size_bytes", "compression_ratio", "params", "nonzero_params", "sparsity", "macs"]
    for b in first.batch_sizes:
        cols += [f"latency_ms_b{b}", f"speedup_b{b}"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in metrics.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
