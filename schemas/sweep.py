"""The sweep file (``shrinkflow sweep SWEEP.yaml``), and what one trial is given and gives back.

Validated like params.yaml: frozen models, unknown keys rejected, every field described
(``shrinkflow sweep --schema`` prints the JSON Schema). Trial params themselves are
validated against ``schemas.params.Params`` before any trial starts.

``TrialSpec`` travels to a Dask worker and ``TrialResult`` comes back; the result is also
stored with its Optuna trial, so a resumed sweep reads every finished trial back typed.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from schemas.common import Section, registry
from schemas.metrics import VariantMetrics

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: Objectives the search minimises, read from the final model's row of metrics.json.
OBJECTIVE = re.compile(r"^(size|latency_b[1-9]\d*)$")


class Range(Section):
    """A numeric interval: sampled by ``random`` and ``auto``, cut into ``steps`` values by ``grid``."""

    low: float = Field(description="Smallest value (inclusive).")
    high: float = Field(description="Largest value (inclusive).")
    log: bool = Field(False, description="Space values evenly in log scale (needs low > 0), e.g. for learning rates.")
    integer: bool = Field(False, description="Round values to integers (e.g. epochs, widths).")
    steps: int = Field(5, ge=2, le=1000, description="Number of values grid search takes from the interval, ends included.")

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
    mode: Literal["grid"] = Field(
        "grid", description="Every combination of the space's values (ranges give `steps` values each); Optuna's GridSampler."
    )


class RandomSearch(Section):
    mode: Literal["random"] = Field(
        description="`trials` points drawn at random (ranges sampled continuously), repeats skipped; Optuna's RandomSampler."
    )
    trials: PositiveInt = Field(10, description="Number of points to draw.")
    seed: int = Field(0, ge=0, description="Seed of the draw (the same seed gives the same trials).")


class AutoSearch(Section):
    mode: Literal["auto"] = Field(
        description=(
            "Accuracy-aware search for the config that minimises `objective` while meeting `criterion`: the "
            "criterion is an Optuna constraint (quality drop - max_drop <= 0), so the sampler learns which "
            "configs pass and, among those, which are smallest (or fastest). Ranges are sampled continuously. "
            "Stops at the budget, or when every point of an all-list space was tried."
        )
    )
    sampler: Literal["tpe", "gp", "nsga2"] = Field(
        "tpe",
        description=(
            "tpe: Optuna's TPESampler with constraints (minimises the objective); gp: GPSampler (Gaussian process, "
            "good for small budgets over numeric keys); nsga2: NSGAIISampler on quality x size x latency at once "
            "(a multi-objective study: Optuna cannot prune its trials, so early_stop stays off)."
        ),
    )
    seed: int = Field(0, ge=0, description="Seed of the sampler.")
    initial: PositiveInt | None = Field(
        None,
        description=(
            "Random trials before the sampler starts to model the results (tpe/gp: n_startup_trials; "
            "nsga2: the population size); null = twice the number of parallel workers, at least 4."
        ),
    )


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


class EarlyStop(Section):
    """Stop hopeless trials: Optuna's ThresholdPruner on the quality drop after each stage."""

    enabled: bool | None = Field(
        None,
        description=(
            "After each stage that feeds the final model (prune, quantize, distill), a trial reports its quality "
            "drop on the validation split vs its teacher; one already more than `margin` beyond "
            "criterion.max_drop is stopped. null = on wherever Optuna can prune (every search but sampler nsga2)."
        ),
    )
    margin: float = Field(
        0.05,
        ge=0,
        description=(
            "How far beyond criterion.max_drop (in its units: absolute, or relative with criterion.relative) a "
            "validation drop must be before the trial is stopped; later stages (fine-tuning, distillation) may "
            "still recover a little, so keep some slack."
        ),
    )


class StudyStorage(Section):
    """Where the Optuna study lives: it survives a crash and lets `--resume` continue the sweep."""

    storage: str | None = Field(
        None,
        description=(
            "Optuna storage URL, e.g. postgresql://user:pass@db-host/optuna or mysql+pymysql://... for a sweep whose "
            "workers run on several machines; null = SQLite in the results folder (<output>/study.db)."
        ),
    )
    name: str | None = Field(None, description="Study name in the storage; null = the sweep's name.")


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
    early_stop: EarlyStop = Field(default_factory=EarlyStop, description="Stop trials that cannot meet the criterion (Optuna pruner).")
    study: StudyStorage = Field(default_factory=StudyStorage, description="The Optuna study's storage (resumable).")
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


# ------------------------------------------------------------------- trials


class StudyRef(BaseModel):
    """How a trial on a worker finds its Optuna trial, to report each stage's validation quality."""

    model_config = ConfigDict(frozen=True)

    storage: str = Field(description="Optuna storage URL the worker can reach.")
    study_name: str
    trial_id: int = Field(description="Optuna's internal trial id (not the trial number).")
    upper: float | None = Field(description="ThresholdPruner's upper bound on the drop; null: report only, never stop.")
    stages: list[str] = Field(description="Stages whose validation quality bounds the final model's, in chain order.")
    relative: bool = Field(description="Drops relative to the teacher's figure (criterion.relative).")


class TrialSpec(BaseModel):
    """Everything a worker needs to run one trial (paths must exist on the worker)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="The Optuna trial number (teacher tasks: the number of the trial they serve).")
    point: dict[str, Any]
    overrides: list[str]
    project: str
    params_file: str
    cache_dir: str | None
    workdir: str | None = None
    threads: int | None = None
    deadline: float | None = None
    timeout: float | None = None
    keep_workspace: bool = False
    until: str | None = None
    exclude: list[str] = []
    study: StudyRef | None = None


TrialStatus = Literal["done", "failed", "skipped", "pruned", "interrupted"]


class TrialResult(BaseModel):
    """What one trial did: its metrics, or why it failed or was stopped."""

    index: int
    point: dict[str, Any]
    overrides: list[str] = []
    status: TrialStatus
    reason: str | None = None
    pid: int
    host: str
    seconds: float
    started: float | None = Field(None, description="Unix time the trial started (a resumed sweep keeps the first run's).")
    ran: list[str] = []
    reused: list[str] = []
    stage_seconds: dict[str, float] = Field(
        default_factory=dict, description="Seconds from the previous stage's manifest to this stage's (DVC included)."
    )
    val_drops: dict[str, float] = Field(
        default_factory=dict, description="Quality drop vs the teacher on the validation split after each reported stage."
    )
    saved_seconds: float | None = Field(
        None, description="Pruned trials: estimated seconds saved (median time of the skipped stages in finished trials)."
    )
    final_variant: str | None = None
    metrics: VariantMetrics | None = None
    teacher: VariantMetrics | None = None
    report: str | None = None
    workspace: str | None = None
