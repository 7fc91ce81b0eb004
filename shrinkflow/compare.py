"""Paired comparison of two models on the same test examples: is the candidate really worse?

A plain threshold on the accuracy difference ("lose at most 0 points") rejects noise: on
360 test digits one example is 0.28 points. Both models are scored on the *same*
examples, so the comparison is paired, and a paired test only looks at the examples on
which they disagree:

- classification: McNemar's exact test on per-example correctness. Of the ``m``
  examples exactly one model gets right, the candidate wins ``b`` and loses ``c``; with
  no real difference ``c ~ Binomial(m, 1/2)``. The interval of the accuracy difference
  ``(b - c) / n`` is the exact (Clopper–Pearson) interval of ``b / m`` mapped through
  ``d = m (2π - 1) / n``; it inverts the same binomial test, so "candidate significantly
  worse at level α" and "the interval's upper end is below 0" are the same statement.
- regression: the same question on per-example squared errors, a paired t-test on
  their differences (the Diebold–Mariano test with squared loss) with its t interval.

Exact rather than bootstrap for classification: deterministic, no resample count to
choose, and correct when the models disagree on only a handful of examples (where a
percentile bootstrap interval undercovers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Task = Literal["classification", "regression"]


class PairedComparison(BaseModel):
    """Candidate vs production on the same examples (one-sided: is the candidate worse?)."""

    model_config = ConfigDict(frozen=True)

    metric: Literal["accuracy", "mse"]
    test: str = Field(description="The paired test that was run.")
    n: int = Field(description="Examples both models were scored on.")
    production: float = Field(description="Production's metric on those examples.")
    candidate: float = Field(description="The candidate's metric on those examples.")
    difference: float = Field(description="candidate - production, in the metric's units.")
    low: float = Field(description="Lower end of the two-sided (1 - 2·alpha) interval of the difference.")
    high: float = Field(description="Upper end of that interval.")
    p_value: float = Field(description="One-sided p-value of 'the candidate is worse'.")
    alpha: float = Field(description="Significance level of the one-sided test.")
    wins: int | None = Field(None, description="Classification: examples only the candidate gets right.")
    losses: int | None = Field(None, description="Classification: examples only production gets right.")

    @property
    def worse(self) -> bool:
        """True when the candidate is significantly worse than production at level ``alpha``."""
        return self.p_value < self.alpha

    def describe(self) -> str:
        """One line: difference, interval, p-value and decision."""
        scale, unit = (100.0, " pp") if self.metric == "accuracy" else (1.0, "")
        level = round(100 * (1 - 2 * self.alpha), 2)
        counts = f", {self.wins} won / {self.losses} lost" if self.wins is not None else ""
        verdict = "significantly worse" if self.worse else "no significant regression"
        return (
            f"{self.metric} {self.candidate:.4g} vs production {self.production:.4g} on {self.n} examples{counts}: "
            f"difference {scale * self.difference:+.3g}{unit}, {level:g}% interval "
            f"[{scale * self.low:+.3g}, {scale * self.high:+.3g}]{unit}, one-sided p = {self.p_value:.3g} "
            f"({self.test}, alpha {self.alpha:g}): {verdict}"
        )


def paired_comparison(production: np.ndarray, candidate: np.ndarray, y: np.ndarray, task: Task, alpha: float) -> PairedComparison:
    """Compare two models' outputs on the same examples.

    Args:
        production: production's outputs, [N, C] logits (classification) or [N, D] predictions.
        candidate: the candidate's outputs, same shape.
        y: labels [N] (classification) or targets [N, D].
        task: ``classification`` (McNemar exact) or ``regression`` (paired t on squared errors).
        alpha: significance level of the one-sided test, in (0, 0.5).
    """
    from scipy import stats

    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    production, candidate, y = np.asarray(production), np.asarray(candidate), np.asarray(y)
    n = len(y)
    if n == 0 or len(production) != n or len(candidate) != n:
        raise ValueError(f"need outputs for the same examples: {len(production)} and {len(candidate)} for {n} labels")
    if task == "classification":
        right_p = production.argmax(1) == y
        right_c = candidate.argmax(1) == y
        wins, losses = int((right_c & ~right_p).sum()), int((right_p & ~right_c).sum())
        m = wins + losses
        if m == 0:  # they agree on every example's correctness: no evidence either way
            p_value, low, high = 1.0, 0.0, 0.0
        else:
            p_value = float(stats.binomtest(losses, m, 0.5, alternative="greater").pvalue)
            ci = stats.binomtest(wins, m, 0.5).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
            low, high = m * (2 * ci.low - 1) / n, m * (2 * ci.high - 1) / n
        return PairedComparison(
            metric="accuracy", test="McNemar exact", n=n, production=float(right_p.mean()), candidate=float(right_c.mean()),
            difference=(wins - losses) / n, low=float(low), high=float(high), p_value=p_value, alpha=alpha, wins=wins, losses=losses,
        )
    se_p = ((production - y) ** 2).reshape(n, -1).mean(1).astype(np.float64)
    se_c = ((candidate - y) ** 2).reshape(n, -1).mean(1).astype(np.float64)
    d = se_c - se_p  # > 0: the candidate errs more on this example
    mean = float(d.mean())
    sem = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    if sem == 0.0:  # identical differences everywhere: the sign of the mean is certain
        p_value, low, high = (0.0 if mean > 0 else 1.0), mean, mean
    else:
        p_value = float(stats.t.sf(mean / sem, df=n - 1))
        half = float(stats.t.ppf(1 - alpha, df=n - 1)) * sem
        low, high = mean - half, mean + half
    return PairedComparison(
        metric="mse", test="paired t on squared errors (Diebold-Mariano)", n=n, production=float(se_p.mean()),
        candidate=float(se_c.mean()), difference=mean, low=low, high=high, p_value=p_value, alpha=alpha,
    )


def _row_digests(X: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(X).reshape(len(X), -1)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def unseen(X: np.ndarray, seen: Iterable[np.ndarray]) -> np.ndarray:
    """Boolean mask of the rows of ``X`` that appear in none of the ``seen`` arrays (byte-exact).

    Production is compared on today's test split; when the split changed (new data, another
    seed) some of its examples may be ones production trained on, which favours production.
    """
    known: set[bytes] = set()
    for arr in seen:
        if arr.shape[1:] == X.shape[1:] and arr.dtype == X.dtype:
            known.update(_row_digests(arr))
    return np.array([d not in known for d in _row_digests(X)], dtype=bool)
