"""The sweep's Optuna study: samplers, the pruner, storage, resume, and results read back from it.

The study is the sweep's memory. Each trial is an Optuna trial: the driver asks for a
point, a Dask worker runs it and, after each stage, reports the validation quality drop
to the same trial in the same storage (so Optuna's pruner decides where the trial runs);
the driver then tells the outcome and stores the typed ``TrialResult`` with the trial.
A resumed sweep reads every finished trial back from the storage and reruns only those
that never finished (interrupted, or cut by the time budget).

The criterion is an Optuna constraint (``drop - max_drop <= 0``): TPE, GP and NSGA-II
sample towards configs that pass, and ``study.best_trial`` is the best passing one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from schemas.paths import STAGES
from schemas.sweep import AutoSearch, GridSearch, RandomSearch, Range, StudyRef, Sweep, TrialResult
from shrinkflow.errors import InputError
from shrinkflow.search import assess, decode_choice, encode_choices, objective_column, space_values

STUDY_FILE = "study.db"
#: User attributes: the trial's TrialResult (JSON), the earlier trial a repeated point copies, the sweep's search.
RESULT = "result"
SAME_AS = "same_as"
SEARCH = "search"
#: Study user attribute: trials whose point was queued again by a resume (never queued twice).
REQUEUED = "requeued"
#: Parts of the sweep file a resumed study must share with the one that started it.
SEARCH_KEYS = ("params", "set", "space", "search", "criterion", "objective", "early_stop")
CONSTRAINT = "drop_over_max"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ storage


def storage_url(sweep: Sweep, out: Path) -> str:
    """The study's storage: the sweep's URL, else SQLite in the results folder."""
    return sweep.study.storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"


def study_name(sweep: Sweep) -> str:
    return sweep.study.name or sweep.name


def storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for the lock (the driver and the workers write to one file)."""
    from sqlalchemy.exc import IntegrityError

    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except IntegrityError:
            # Another process created the same new database at the same moment (both insert its schema
            # version); once that row is there, opening it again simply finds it.
            if attempt == 2:
                raise InputError(f"study.storage {url!r}: the storage's schema could not be initialised") from None
            time.sleep(0.5)
        except Exception as exc:  # a bad URL, a missing driver, an unreachable server
            raise InputError(f"study.storage {url!r}: cannot open the Optuna storage ({type(exc).__name__}: {exc})") from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ the search space and samplers


def distributions(sweep: Sweep) -> dict[str, BaseDistribution]:
    """Optuna distributions of the space: lists are categorical, ranges numeric (grid: their ``steps`` values)."""
    out: dict[str, BaseDistribution] = {}
    grid = isinstance(sweep.search, GridSearch)
    for key, spec in sweep.space.items():
        if isinstance(spec, Range) and not grid:
            if spec.integer:
                out[key] = IntDistribution(math.ceil(spec.low), math.floor(spec.high), log=spec.log)
            else:
                out[key] = FloatDistribution(spec.low, spec.high, log=spec.log)
        else:
            values = spec.values() if isinstance(spec, Range) else list(spec)
            out[key] = CategoricalDistribution(encode_choices(values))
    return out


def multi_objective(sweep: Sweep) -> bool:
    return isinstance(sweep.search, AutoSearch) and sweep.search.sampler == "nsga2"


def early_stop_on(sweep: Sweep) -> bool:
    """Whether hopeless trials are stopped: Optuna prunes single-objective studies only."""
    return sweep.early_stop.enabled if sweep.early_stop.enabled is not None else not multi_objective(sweep)


def startup_trials(sweep: Sweep, slots: int) -> int:
    s = sweep.search
    return s.initial if isinstance(s, AutoSearch) and s.initial else max(4, 2 * slots)


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler for ask-and-tell.

    Its ``after_trial`` calls ``study.stop()`` once the grid is covered, which Optuna
    allows only inside ``optimize()``: with ask-and-tell the last ``tell`` raises
    RuntimeError (documented; optuna/optuna#5141). The scheduler stops at the grid's size itself.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        return None


def make_sampler(sweep: Sweep, slots: int) -> optuna.samplers.BaseSampler:
    """grid → GridSampler, random → RandomSampler, auto → TPE (constrained), GP or NSGA-II."""
    s = sweep.search
    if isinstance(s, GridSearch):
        grid = {k: encode_choices(v) for k, v in space_values(sweep.space).items()}
        return AskTellGridSampler(grid, seed=0)
    if isinstance(s, RandomSearch):
        return optuna.samplers.RandomSampler(seed=s.seed)
    n0 = startup_trials(sweep, slots)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=n0)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(2, n0))
    # constant_liar: a trial still running counts as a bad one, so parallel workers get different points.
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=n0, multivariate=True, constant_liar=True)


def objective_names(sweep: Sweep, latency_key: str | None) -> list[str]:
    """The study's objectives, all minimised: the sweep's objective, or (nsga2) the quality drop, size and latency.

    The drop (accuracy lost or MSE gained vs the trial's teacher) stands for quality, so
    classification and regression sweeps share one direction.
    """
    if not multi_objective(sweep):
        return [objective_column(sweep.objective)]
    return ["drop", "size_bytes", *([latency_key] if latency_key else [])]


def pruner(upper: float | None) -> optuna.pruners.BasePruner:
    return optuna.pruners.ThresholdPruner(upper=upper) if upper is not None else optuna.pruners.NopPruner()


def prune_bound(sweep: Sweep) -> float | None:
    """The drop above which a trial is stopped; None when early stopping is off."""
    return sweep.criterion.max_drop + sweep.early_stop.margin if early_stop_on(sweep) else None


# ------------------------------------------------------------------ opening and resuming


def _search_of(sweep: Sweep) -> dict[str, Any]:
    return json.loads(json.dumps(sweep.model_dump(mode="json", by_alias=True, include=set(SEARCH_KEYS))))


def check_study(sweep: Sweep, out: Path, names: list[str], resume: bool) -> tuple[optuna.storages.RDBStorage, bool]:
    """Whether the study can be opened as asked, creating nothing; returns the storage and whether the study exists.

    Without ``resume`` an existing study is an error (nothing is overwritten); with it, the
    sweep file must still describe the same search (budget, cluster and timeouts may change).
    """
    url, name = storage_url(sweep, out), study_name(sweep)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    store = storage(url)
    exists = name in optuna.get_all_study_names(store)
    if exists and not resume:
        n = len(optuna.load_study(study_name=name, storage=store).trials)
        raise InputError(
            f"study {name!r} already exists in {url} ({n} trials): continue it with --resume, "
            f"or start over after deleting {out if sweep.study.storage is None else 'that study'} "
            "(or give the sweep another name)"
        )
    if exists:
        study = optuna.load_study(study_name=name, storage=store)
        before, now = study.user_attrs.get(SEARCH), _search_of(sweep)
        if before is not None and before != now:
            changed = sorted(k for k in SEARCH_KEYS if before.get(k) != now.get(k))
            raise InputError(
                f"--resume: the sweep file's {', '.join(changed)} changed since study {name!r} began; a resumed study "
                "needs the same search (budget, cluster, trial_timeout and workdir may change). Restore them, or "
                "start a new sweep under another name"
            )
        if study.metric_names is not None and list(study.metric_names) != names:
            raise InputError(f"--resume: study {name!r} has objectives {study.metric_names}, this sweep {names}")
    return store, exists


def open_study(sweep: Sweep, out: Path, slots: int, names: list[str], resume: bool) -> tuple[optuna.Study, list[str]]:
    """Create the sweep's study, or (``resume``) load it; returns it with notes for the log."""
    store, exists = check_study(sweep, out, names, resume)
    notes = [] if exists or not resume else [f"--resume: no study {study_name(sweep)!r} in {storage_url(sweep, out)} yet; starting one"]
    study = optuna.create_study(
        study_name=study_name(sweep), storage=store, sampler=make_sampler(sweep, slots), pruner=pruner(prune_bound(sweep)),
        directions=["minimize"] * len(names), load_if_exists=True,
    )
    if not exists:
        study.set_user_attr(SEARCH, _search_of(sweep))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study, notes


def requeue_unfinished(study: optuna.Study) -> list[int]:
    """Resume: fail trials left running by a dead sweep and queue every unfinished point again.

    Unfinished: interrupted (left RUNNING), or cut by the time budget. Finished trials
    (done, pruned, failed) are never rerun. Returns the trial numbers queued again.
    """
    done_before = set(study.user_attrs.get(REQUEUED, []))
    queued = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            # The sweep that asked for it is gone (a lock guards a live sweep): close it as failed.
            trial = optuna.trial.Trial(study, t._trial_id)
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
        elif not _cut_by_budget(t):
            continue
        if t.number in done_before or SAME_AS in t.user_attrs:
            continue
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
        queued.append(t.number)
    if queued:
        study.set_user_attr(REQUEUED, sorted(done_before | set(queued)))
    return queued


def _cut_by_budget(t: FrozenTrial) -> bool:
    res = t.user_attrs.get(RESULT)
    return bool(res) and (res["status"] == "skipped" or (res["status"] == "failed" and (res.get("reason") or "").startswith("budget")))


# ------------------------------------------------------------------ points and results


def point_of(params: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
    """A trial's Optuna params as the sweep's point (JSON-encoded choices decoded)."""
    values = space_values(sweep.space)
    return {k: params[k] if isinstance(spec, Range) else decode_choice(params[k], values[k]) for k, spec in sweep.space.items()}


def results_of(study: optuna.Study) -> list[TrialResult]:
    """Every trial the study holds a result for, plus interrupted ones; repeats of a point left out."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if SAME_AS in t.user_attrs:
            continue
        if RESULT in t.user_attrs:
            out.append(TrialResult.model_validate(t.user_attrs[RESULT]))
        elif t.user_attrs.get("interrupted"):
            out.append(TrialResult(
                index=t.number, point=t.user_attrs.get("point", {}), status="interrupted", pid=-1, host="-", seconds=0.0,
                reason="the sweep stopped during this trial (killed or crashed); --resume ran its point again",
            ))
    return out


def tell(study: optuna.Study, trial: optuna.trial.Trial, result: TrialResult, sweep: Sweep, names: list[str]) -> None:
    """Record a trial's outcome: its result as a user attribute, the criterion as a constraint, its values."""
    trial.set_user_attr(RESULT, result.model_dump(mode="json", exclude={"report"}))
    a = assess(result, sweep)
    if result.status == "done":
        trial.set_constraint(CONSTRAINT, a["drop"] - sweep.criterion.max_drop)
        values = [a["drop"] if n == "drop" else _value(result, n) for n in names]
        if all(math.isfinite(v) for v in values):
            study.tell(trial, values)
            return
        study.tell(trial, state=TrialState.FAIL)
    elif result.status == "pruned" and result.val_drops:
        trial.set_constraint(CONSTRAINT, list(result.val_drops.values())[-1] - sweep.criterion.max_drop)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def tell_repeat(study: optuna.Study, trial: optuna.trial.Trial, earlier: FrozenTrial) -> None:
    """Answer a point the study already ran with that trial's outcome, without running it again."""
    trial.set_user_attr(SAME_AS, earlier.number)
    for key, value in earlier.constraints.items():
        trial.set_constraint(key, value)
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, earlier.values)
    elif earlier.state == TrialState.PRUNED and not multi_objective_study(study):
        for step, v in earlier.intermediate_values.items():
            trial.report(v, step)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def multi_objective_study(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def _value(result: TrialResult, name: str) -> float:
    v = result.metrics.get(name) if result.metrics is not None else None
    return float(v) if isinstance(v, int | float) else math.nan


def study_ref(study: optuna.Study, trial: optuna.trial.Trial, url: str, sweep: Sweep, stages: list[str]) -> StudyRef | None:
    """What a worker needs to report to this trial; None for multi-objective studies (Optuna cannot prune them)."""
    if multi_objective_study(study):
        return None
    return StudyRef(storage=url, study_name=study.study_name, trial_id=trial._trial_id, upper=prune_bound(sweep),
                    stages=stages, relative=sweep.criterion.relative)


# ------------------------------------------------------------------ the worker's side


class StageReporter:
    """Reports a trial's validation drop after each stage to its Optuna trial; says when to stop.

    Runs on the Dask worker. It builds a ``Trial`` for the id the driver asked for:
    Optuna's distributed pattern (every process opens the study from shared storage).
    """

    def __init__(self, ref: StudyRef):
        self.ref = ref
        self._trial: optuna.trial.Trial | None = None

    def report(self, stage: str, drop: float) -> bool:
        """Record ``drop`` after ``stage``; True when the pruner says the trial cannot meet the criterion."""
        if self._trial is None:
            study = optuna.load_study(
                study_name=self.ref.study_name, storage=storage(self.ref.storage),
                sampler=optuna.samplers.RandomSampler(), pruner=pruner(self.ref.upper),
            )
            self._trial = optuna.trial.Trial(study, self.ref.trial_id)
        self._trial.report(drop if math.isfinite(drop) else math.nan, step=STAGES.index(stage))
        return self._trial.should_prune()


# ------------------------------------------------------------------ plots


def plot_importances(study: optuna.Study, path: Path, target_name: str) -> str | None:
    """Parameter importances for the first objective (Optuna's default evaluator) as PNG.

    Returns None when written, else why it could not be drawn (too few finished trials...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_param_importances

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return "parameter importances need at least 2 finished trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notices
            ax = plot_param_importances(study, target=lambda t: t.values[0], target_name=target_name)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. no parameter varied among finished trials
        return f"parameter importances not drawn: {exc}"
    fig = ax.figure
    fig.set_size_inches(7, max(2.5, 0.6 * len(done[0].params) + 1.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
