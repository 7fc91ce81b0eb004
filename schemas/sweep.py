"""The sweep file (``shrinkflow sweep SWEEP.yaml``): many params variations, run as isolated trials.

Validated like params.yaml: frozen models, unknown keys rejected, every field described
(``shrinkflow sweep --schema`` prints the JSON Schema). Trial params themselves are
validated against ``schemas.params.Params`` before any trial starts.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from schemas.common import Section, registry

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: Objectives the search minimises, read from the final model's row of metrics.json.
OBJECTIVE = re.compile(r"^(size|latency_b[1-9]\d*)$")


class Range(Section):
    """A numeric interval: sampled by ``random``, cut into ``steps`` values by ``grid`` and ``auto``."""

    low: float = Field(description="Smallest value (inclusive).")
    high: float = Field(description="Largest value (inclusive).")
    log: bool = Field(False, description="Space values evenly in log scale (needs low > 0), e.g. for learning rates.")
    integer: bool = Field(False, description="Round values to integers (e.g. epochs, widths).")
    steps: int = Field(5, ge=2, le=1000, description="Number of values grid and auto search take from the interval, ends included.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        return self

    def values(self) -> list[float | int]:
        """The ``steps`` grid values, ends included, duplicates (after rounding) removed."""
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            raw = [math.exp(a + (b - a) * i / (self.steps - 1)) for i in range(self.steps)]
        else:
            raw = [self.low + (self.high - self.low) * i / (self.steps - 1) for i in range(self.steps)]
        out: list[float | int] = []
        for v in raw:
            v = int(round(v)) if self.integer else float(f"{v:.6g}")
            if v not in out:
                out.append(v)
        return out


# ------------------------------------------------------------------- search modes


class GridSearch(Section):
    mode: Literal["grid"] = Field("grid", description="Every combination of the space's values (ranges give `steps` values each).")


class RandomSearch(Section):
    mode: Literal["random"] = Field(description="`trials` points drawn at random (ranges sampled continuously), duplicates skipped.")
    trials: PositiveInt = Field(10, description="Number of points to draw.")
    seed: int = Field(0, ge=0, description="Seed of the draw (the same seed gives the same trials).")


class AutoSearch(Section):
    mode: Literal["auto"] = Field(
        description=(
            "Accuracy-aware search for the config that minimises `objective` while meeting `criterion`: "
            "a seeded random start, then neighbours (one key moved one step) of the best passing trial, "
            "preferring steps that finished trials say lower the objective, with some random exploration. "
            "Stops at the budget or when every point was tried."
        )
    )
    seed: int = Field(0, ge=0, description="Seed of the random start and of exploration.")
    initial: PositiveInt | None = Field(
        None, description="Random points tried before the local search starts; null = the number of parallel workers (at least 2)."
    )
    explore: float = Field(0.2, ge=0, le=1, description="Chance that a proposal is a random untried point instead of a neighbour.")


SearchParams = registry("mode", "grid", GridSearch, RandomSearch, AutoSearch)


# ------------------------------------------------------------------- selection


class Criterion(Section):
    """The accuracy budget a trial must meet to be chosen."""

    max_drop: float = Field(
        0.01,
        ge=0,
        description=(
            "Largest allowed quality loss of the final model vs its teacher (same trial): accuracy "
            "drop for classification, MSE increase for regression."
        ),
    )
    relative: bool = Field(
        False,
        description="false: max_drop is absolute (0.01 = 1 pp of accuracy); true: a fraction of the teacher's figure (0.01 = 1 %).",
    )


class Budget(Section):
    trials: PositiveInt | None = Field(None, description="Most trials to run (all modes); null = no limit.")
    seconds: float | None = Field(
        None,
        gt=0,
        description=(
            "Wall-clock limit for the whole sweep; trials still running then are stopped and recorded "
            "as failed ('budget'). The best passing result so far is always written. null = no limit."
        ),
    )


class Cluster(Section):
    address: str | None = Field(
        None,
        description=(
            "Address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786); its workers must see the "
            "project and the DVC cache at the same paths. null = start a LocalCluster on this machine."
        ),
    )
    workers: PositiveInt = Field(2, description="LocalCluster worker processes (one trial at a time each). Ignored with `address`.")
    threads_per_trial: PositiveInt | None = Field(
        None, description="torch/OpenMP threads of each trial's stages; null = CPU cores / workers (at least 1)."
    )


class Sweep(Section):
    """A sweep: which params to vary, how to search, what to keep."""

    name: str = Field("sweep", pattern=r"^[\w.-]+$", description="Sweep name; the default output folder is sweeps/<name>.")
    params: str = Field("params.yaml", description="Base params file (relative to the project root) every trial starts from.")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed overrides for every trial, as dotted key: value (e.g. train_teacher.epochs: 8).",
    )
    space: dict[str, list[Any] | Range] = Field(
        min_length=1,
        description=(
            "What varies: dotted params key → list of values (any YAML value), or a range "
            "{low, high, log, integer, steps}. E.g. prune.sparsity: [0.5, 0.8, 0.9]."
        ),
    )
    search: SearchParams = Field(default_factory=GridSearch, description="How points of the space are chosen: grid, random or auto.")
    criterion: Criterion = Field(default_factory=Criterion, description="Accuracy budget for the chosen config (and auto's search).")
    objective: str = Field(
        "size",
        description=(
            "What the chosen config minimises among trials meeting the criterion: size (bytes of the "
            "final model file) or latency_bN (CPU ms at batch N; N must be in evaluate.batch_sizes)."
        ),
    )
    budget: Budget = Field(default_factory=Budget, description="Limits on trials and wall time.")
    cluster: Cluster = Field(default_factory=Cluster, description="Where trials run (Dask).")
    trial_timeout: float | None = Field(None, gt=0, description="Seconds after which one trial is stopped and recorded as failed; null = none.")
    reuse_teacher: bool = Field(
        True,
        description=(
            "Train each distinct teacher once, before the trials that share it, so they restore it from "
            "DVC's run-cache instead of retraining; false trains it in every trial (for comparison)."
        ),
    )
    output: str | None = Field(None, description="Results folder (relative to the project root); null = sweeps/<name>.")
    workdir: str | None = Field(
        None, description="Where trial workspaces are created (on each worker); null = the system temp folder."
    )
    keep_workspaces: bool = Field(False, description="Keep each trial's workspace (models, reports) instead of deleting it.")

    @field_validator("set", "space")
    @classmethod
    def _dotted_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _KEY.match(key):
                raise ValueError(f"{key!r} is not a dotted params key (e.g. prune.sparsity)")
        return value

    @field_validator("space")
    @classmethod
    def _non_empty_lists(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, v in value.items():
            if isinstance(v, list) and not v:
                raise ValueError(f"{key}: give at least one value")
        return value

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        if not OBJECTIVE.match(value):
            raise ValueError(f"got {value!r}; use size or latency_bN (e.g. latency_b1)")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> Sweep:
        both = sorted(set(self.set) & set(self.space))
        if both:
            raise ValueError(f"{', '.join(both)} is both in `set` and in `space`: keep it in one of them")
        return self
