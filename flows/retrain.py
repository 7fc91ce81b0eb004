"""The retrain flow: refresh data → reproduce the chain → gates → publish → promote.

Scheduled nightly (``retrain/nightly`` in prefect.yaml). Every step leaves deciding to
the tool that owns it: DVC decides what to recompute (unchanged data → nothing runs), the
evaluate stage computes the configured gates, GTO holds which model is in production.

- refresh: bring ``data.path`` up to date (``dvc update`` for a DVC import, ``dvc add``
  for a DVC-tracked folder; a plain watched folder needs nothing). Retried with backoff.
- reproduce: one task per stage, the compress flow's own task, so each stage's lines
  land in this run's logs.
- gates: evaluate's gates (reports/evaluate.json) plus the comparison with production:
  the production model, read from DVC at its registered commit, and the candidate are
  scored on the same test examples (those production did not train on). The paired gate
  (``significance``) fails only a *significant* regression; ``max_regression`` is the
  plain threshold on the difference.
- publish: ``dvc push --run-cache``, then the candidate commit (built aside, in a
  temporary index) and any registry tag the git remote lacks, in one atomic push.
- promote, last: GTO registers the commit and assigns the stage, and the new tags are
  pushed atomically; if that push fails the local tags are deleted again, so production
  never moves locally without the remote.

A candidate that is not promoted (a failed gate, a failed step before promotion, or
``promote=false``) leaves the workspace as it was before the run: params.yaml, dvc.lock,
the reports and DVC's outputs are restored (``dvc checkout``), and the candidate is kept
on a branch ``rejected/NAME/TIMESTAMP`` (its dvc.lock pins the models in DVC's cache).

The run ends in a state that says what happened to production: ``Promoted`` or
``Unchanged`` (Completed), ``Evaluated`` (Completed, promote=false), ``Rejected`` (a
gate failed) or ``Failed`` (a step failed; production unchanged), each with a one-line
message. Two runs must never share one workspace: the deployments use
``concurrency_limit: 1`` and ``shrinkflow serve`` caps the work pool at one run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from flows.compress import changes_artifact
from flows.compress import stage as reproduce_stage
from flows.ops.dvcrepo import Snapshot, WorkspaceBusy, open_repo, pipeline_outputs, workspace_lock
from schemas.metrics import Metrics
from schemas.outputs import GateResult, read_manifest
from schemas.paths import STAGES, StagePaths
from shrinkflow.compare import PairedComparison
from shrinkflow.config import PARAMS_FILE, apply_to_params_file, load_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.report import quality_drop, render_table

#: GTO artifact names: lowercase letters, digits, dashes (and / for namespaces).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-/]*[a-z0-9])?$"


class DataRefresh(BaseModel):
    path: str
    updated: list[str] = Field(description="DVC-tracked sources refreshed (dvc update / dvc add).")
    changed: bool = Field(description="True when the data itself differs from what dvc.lock recorded.")
    reasons: list[str] = Field(description="Why the data stage is out of date (data, params or code), if it is.")


class GateReport(BaseModel):
    final_variant: str
    gates: list[GateResult]
    comparison: PairedComparison | None = Field(description="Candidate vs production on the same test examples.")
    notes: list[str]


class NotPromoted(ShrinkflowError):
    """The run ended without moving production (a gate failed, a step failed, or promote=false).

    The data of a Failed end state: ``result`` holds what the run found.
    """

    def __init__(self, decision: str, result: RetrainResult):
        super().__init__(decision)
        self.result = result


class _ExpectedOutcome(logging.Filter):
    """Drop the traceback Prefect's engine logs for a Failed state a flow *returned*.

    Run by a worker, the engine re-raises the end state to end the process and logs it as
    "Engine execution exited with unexpected exception" with a traceback. A candidate that
    was not promoted is an expected outcome whose reason is already in the state message,
    the artifact and the run's log, so only that record is dropped (nothing else matches).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], NotPromoted))


if not any(isinstance(f, _ExpectedOutcome) for f in logging.getLogger("prefect.flow_runs").filters):
    logging.getLogger("prefect.flow_runs").addFilter(_ExpectedOutcome())


def result_of(state: State) -> RetrainResult:
    """What a retrain run found, from its end state (Completed or Failed), e.g. ``retrain(..., return_state=True)``."""
    out = state.result(raise_on_failure=False)
    return out.result if isinstance(out, NotPromoted) else out


class RetrainResult(BaseModel):
    ran: list[str] = Field(description="Stages DVC recomputed in this run.")
    gates: list[GateResult]
    comparison: PairedComparison | None = None
    version: str | None = Field(description="Version in production after the run.")
    promoted: bool = Field(description="True when this run moved production to a new version.")
    published: str | None = Field(None, description="What was pushed to the DVC remote.")
    candidate: str | None = Field(None, description="Commit holding the candidate (on the branch when promoted).")
    kept_on: str | None = Field(None, description="Branch keeping a candidate that was not promoted.")
    decision: str


# ---------------------------------------------------------------------------- refresh


def _why_out_of_date(status: dict, data_path: str) -> tuple[bool, list[str]]:
    """(data changed, reasons) from ``dvc status`` of the data stage."""
    changed, reasons = False, []
    for entry in status.get("data", []):
        if not isinstance(entry, dict):
            reasons.append(str(entry))
            continue
        for dep, what in entry.get("changed deps", {}).items():
            if isinstance(what, dict):  # a params file: {"data": "modified"}
                reasons += [f"params {key} {how}" for key, how in what.items()]
            else:
                changed |= dep == data_path
                reasons.append(f"{dep} {what}")
        reasons += [f"output {out} {how}" for out, how in entry.get("changed outs", {}).items()]
    return changed, reasons


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def refresh_data(root: str) -> DataRefresh:
    """Update DVC-tracked data sources and say why the data stage is out of date, if it is."""
    import yaml

    rootp = Path(root)
    rel = load_params(rootp / PARAMS_FILE, root=rootp).data.path
    dvcfile = rootp / f"{rel}.dvc"
    updated: list[str] = []
    with open_repo(rootp) as repo:
        if dvcfile.is_file():
            spec = yaml.safe_load(dvcfile.read_text()) or {}
            if spec.get("deps"):  # dvc import / import-url: fetch what the source has now
                repo.update(targets=[str(dvcfile)])
            else:  # dvc add: re-hash the folder (new files dropped in); unchanged → no-op
                repo.add([str(rootp / rel)])
            updated.append(dvcfile.relative_to(rootp).as_posix())
        changed, reasons = _why_out_of_date(repo.status(targets=["dvc.yaml:data"]), rel)
    logger = get_run_logger()
    logger.info("data %s: %s", rel, "changed since dvc.lock" if changed else "unchanged since dvc.lock")
    if reasons:
        logger.info("data stage out of date: %s", "; ".join(reasons))
    return DataRefresh(path=rel, updated=updated, changed=changed, reasons=reasons)


# ------------------------------------------------------------------------------ gates


def _read_at(root: Path, rel: str, commit: str, dest: Path) -> Path:
    """Copy ``rel`` as it was at ``commit`` (DVC's cache or remote) to ``dest``."""
    import dvc.api

    with dvc.api.open(rel, repo=str(root), rev=commit, mode="rb") as src:
        dest.write_bytes(src.read())
    return dest


def compare_with_production(root: Path, prod, candidate_path: str, alpha: float) -> tuple[PairedComparison, list[str]]:
    """Score production (read at its commit) and the candidate on the same test examples.

    The examples are today's test split minus those production trained or validated on
    (its own splits, read at its commit): when the split changed, production would
    otherwise be scored partly on its training data.
    """
    import numpy as np

    from schemas.params import trusted
    from shrinkflow.compare import paired_comparison, unseen
    from shrinkflow.data import load_splits
    from shrinkflow.loading import load
    from shrinkflow.training import predict

    notes: list[str] = []
    allow = trusted(load_params(root / PARAMS_FILE, root=root))
    paths = StagePaths(root)
    today = load_splits(paths.splits)
    rel = prod.record.get("path")
    if not rel:
        raise ShrinkflowError(f"{prod.tag} records no model path")
    with tempfile.TemporaryDirectory() as tmp:
        prod_model = load(_read_at(root, rel, prod.commit, Path(tmp) / Path(rel).name), allow)  # the suffix picks the format
        try:
            then = load_splits(_read_at(root, paths.rel(paths.splits), prod.commit, Path(tmp) / "splits.npz"))
            keep = unseen(today.X_test, [then.X_train, then.X_val])
            if not keep.all():
                notes.append(f"{int((~keep).sum())} of {len(keep)} test examples left out: {prod.tag} trained or validated on them")
        except Exception as exc:  # its splits are gone from the cache and the remote: say what that means
            keep = np.ones(len(today.X_test), dtype=bool)
            notes.append(f"{prod.tag}'s training split could not be read ({type(exc).__name__}); compared on the whole test split, "
                         "which favours production if it trained on some of it")
    if not keep.any():
        raise ShrinkflowError(f"every test example was in {prod.tag}'s training or validation split: nothing fair to compare on")
    X = today.tensors("test")[0][keep]
    y = today.y_test[keep]
    candidate = load(root / candidate_path, allow)
    comparison = paired_comparison(predict(prod_model, X).numpy(), predict(candidate, X).numpy(), y, today.task, alpha)
    return comparison, notes


@task(cache_policy=NO_CACHE)
def check_gates(root: str, name: str, stage: str, significance: float | None, max_regression: float | None) -> GateReport:
    """Evaluate's gates plus the comparison with the model now in ``stage``."""
    from flows.ops.registry import in_stage, same_model

    rootp = Path(root)
    evaluation = read_manifest("evaluate", rootp)
    final = Metrics.read(rootp)[evaluation.final_variant]
    gates = list(evaluation.gates)
    notes: list[str] = []
    prod = in_stage(rootp, name, stage)
    if prod is None:
        notes.append(f"no model in {stage!r} yet: nothing to compare against")
        return GateReport(final_variant=evaluation.final_variant, gates=gates, comparison=None, notes=notes)
    if same_model(rootp, prod.commit, None):
        notes.append(f"the candidate is {prod.tag} itself (same dvc.lock and params): nothing to compare")
        return GateReport(final_variant=evaluation.final_variant, gates=gates, comparison=None, notes=notes)
    if significance is None and max_regression is None:
        notes.append(f"no comparison with {stage}: significance and max_regression are both null")
        return GateReport(final_variant=evaluation.final_variant, gates=gates, comparison=None, notes=notes)
    comparison = None
    try:
        comparison, more = compare_with_production(rootp, prod, final.path, significance or 0.05)
        notes += more
    except Exception as exc:  # a production model the current code cannot read
        notes.append(f"{prod.tag} could not be scored on today's test split ({type(exc).__name__}: {exc})")
    qkey = final.quality_key
    if comparison is not None:
        notes.insert(0, f"{prod.tag} vs candidate: {comparison.describe()}")
        if significance is not None:
            gates.append(GateResult(name=f"no_significant_regression_vs_{stage}", limit=significance, value=comparison.p_value,
                                    passed=not comparison.worse))
        prod_q, cand_q = comparison.production, comparison.candidate
    else:
        if significance is not None:
            notes.append("paired gate skipped: it needs both models' outputs on the same examples")
        recorded = prod.record.get("metrics", {}).get(qkey)
        prod_q, cand_q = (float(recorded) if recorded is not None else None), final.quality
        if prod_q is not None:
            notes.append(f"plain gate uses {prod.tag}'s {qkey} recorded at promotion ({prod_q:.4g}) and the candidate's on today's test split")
    if max_regression is not None:
        if prod_q is None:
            notes.append(f"plain gate skipped: {prod.tag} has no {qkey}")
        else:  # accuracy: points lost; mse: relative increase
            value = quality_drop(prod_q, cand_q, qkey, relative=qkey == "mse")
            gates.append(GateResult(name=f"no_regression_vs_{stage}", limit=max_regression, value=value, passed=value <= max_regression))
    return GateReport(final_variant=evaluation.final_variant, gates=gates, comparison=comparison, notes=notes)


def _gate_reason(g: GateResult, comparison: PairedComparison | None) -> str:
    if g.name.startswith("no_significant_regression") and comparison is not None:
        scale, unit = (100.0, " pp") if comparison.metric == "accuracy" else (1.0, "")
        return (f"{g.name}: {comparison.metric} {scale * comparison.difference:+.3g}{unit} "
                f"[{scale * comparison.low:+.3g}, {scale * comparison.high:+.3g}], p = {g.value:.3g} < {g.limit:g}")
    return f"{g.name} = {g.value:.4g} (limit {g.limit:g})"


# ---------------------------------------------------------------------- publish, promote


class PromotionFailed(ShrinkflowError):
    """A step of publishing or promotion failed; production did not move."""


def _retry_unless_refused(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry a git push that failed in transit, not one the remote refused."""
    return not getattr(state.data, "rejected", False)


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def publish(root: str, remote: str | None) -> str:
    """``dvc push --run-cache`` to ``remote`` (default: DVC's default remote)."""
    from flows.ops.publish import push_outputs

    result = push_outputs(Path(root), remote)
    if result.remote is None:
        get_run_logger().warning(result.describe())
    return result.describe()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_unless_refused)
def push_refs(root: str, git_remote: str, refspecs: list[str]) -> None:
    """One atomic ``git push``: the remote takes every refspec or none."""
    from flows.ops.publish import push_git

    push_git(Path(root), git_remote, refspecs)
    get_run_logger().info("pushed to %s: %s", git_remote, " ".join(refspecs))


@task(cache_policy=NO_CACHE)
def assign(root: str, name: str, stage: str, record: dict, commit: str) -> tuple[str, list[str]]:
    """Register ``commit`` (if new) and assign it ``stage`` locally; returns (version, tags created)."""
    from flows.ops.registry import register_and_assign, registry_tags

    rootp = Path(root)
    before = registry_tags(rootp, name)
    v = register_and_assign(rootp, record, name, stage, commit)
    return v.version, sorted(set(registry_tags(rootp, name)) - set(before))


# -------------------------------------------------------------------------------- flow


def _decision_markdown(metrics: Metrics | None, report: GateReport | None, decision: str) -> str:
    lines = [render_table(metrics), ""] if metrics is not None else []
    if report is not None:
        lines += ["| gate | value | limit | result |", "|---|---|---|---|"]
        lines += [f"| {g.name} | {g.value:.4g} | {g.limit:g} | {'pass' if g.passed else '**FAIL**'} |" for g in report.gates]
        c = report.comparison
        if c is not None:
            scale, unit = (100.0, " pp") if c.metric == "accuracy" else (1.0, "")
            lines += ["", f"**Candidate vs production** ({c.test}, {c.n} test examples neither model trained on):", "",
                      f"| {c.metric} production | {c.metric} candidate | difference | {round(100 * (1 - 2 * c.alpha), 2):g}% interval | one-sided p | decision |",
                      "|---|---|---|---|---|---|",
                      f"| {c.production:.4g} | {c.candidate:.4g} | {scale * c.difference:+.3g}{unit} | "
                      f"[{scale * c.low:+.3g}, {scale * c.high:+.3g}]{unit} | {c.p_value:.3g} | "
                      f"{'significantly worse' if c.worse else 'no significant regression'} (alpha {c.alpha:g}) |"]
        lines += ["", *(f"- {n}" for n in report.notes)]
    lines += ["", f"**Decision:** {decision}", ""]
    return "\n".join(lines)


@flow(name="retrain")
def retrain(
    root: str = ".",
    overrides: list[str] | None = None,
    model_name: Annotated[str, Field(pattern=NAME_PATTERN, description="GTO artifact name of the model.")] = "shrinkflow",
    stage: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="GTO stage that serves production.")] = "prod",
    significance: Annotated[float | None, Field(gt=0, lt=0.5, description=(
        "Significance level of the paired gate: the candidate fails only when it is significantly worse than production "
        "on the same test examples (McNemar's exact test; paired t on squared errors for regression); null = no paired gate."
    ))] = 0.05,
    max_regression: Annotated[float | None, Field(ge=0, description=(
        "Plain gate: allowed loss vs production on the same test examples (accuracy points, or relative MSE increase), "
        "noise included; null = no plain gate."
    ))] = None,
    promote: Annotated[bool, Field(description="False: run and gate the candidate, then restore the workspace (nothing is pushed or tagged).")] = True,
    remote: str | None = None,
    git_remote: str = "origin",
) -> RetrainResult:
    """Retrain on fresh data and promote the result if it passes every gate.

    Args:
        root: the project (git + DVC repository).
        overrides: ``key=value`` params edits, written into params.yaml as the compress flow
            does; committed with the candidate when it is promoted, undone otherwise.
        model_name: GTO artifact name; versions are tags ``NAME@vX.Y.Z``.
        stage: the GTO stage that means "in production".
        significance: level of the paired regression test vs production (null: off).
        max_regression: plain allowed loss vs production (null: off).
        promote: False to only evaluate and gate the candidate.
        remote: DVC remote to publish to; default: the repository's default remote (none: skip).
        git_remote: git remote that receives the candidate commit and the registry's tags, if it exists.
    """
    from flows.ops import publish as pub
    from flows.ops import registry

    logger = get_run_logger()
    rootp = Path(root).resolve()
    data_path = load_params(rootp / PARAMS_FILE, root=rootp).data.path
    snapshot = Snapshot.take(rootp, data_path)
    start = registry.head(rootp)
    before = registry.in_stage(rootp, model_name, stage)
    prod_now = before.tag if before else f"no model in {stage}"
    logger.info("production: %s; workspace at %s", prod_now, start[:10])
    result: dict[str, Any] = {"ran": [], "gates": [], "version": before.version if before else None, "promoted": False}
    metrics: Metrics | None = None
    report: GateReport | None = None

    def finish(state: Callable[..., State], name: str, decision: str) -> State:
        result["decision"] = decision
        out = RetrainResult(**result)
        create_markdown_artifact(key="retrain-decision", markdown=_decision_markdown(metrics, report, decision),
                                 description="Retrain: metrics, gates and decision")
        if state is Completed:
            logger.info(decision)
            return Completed(name=name, message=decision, data=out)
        logger.warning(decision)
        return Failed(name=name, message=decision, data=NotPromoted(decision, out))  # a Failed state's data must be an exception

    pending = True  # the workspace still needs restoring if the run stops here (e.g. serve stops a flow run)

    def give_up(why: str) -> str:
        """Restore the workspace; keep the candidate (if there is one) on a branch. Returns what happened."""
        nonlocal pending
        pending = False
        kept = None
        if report is not None:
            commit = registry.candidate_commit(rootp, candidate_paths, f"{model_name} candidate, not promoted: {why}", force=uncached)
            kept = registry.archive(rootp, commit, model_name) if commit != start else None
            result["kept_on"] = kept
        problems = snapshot.restore()
        restored = "workspace restored" if not problems else "workspace restored except: " + "; ".join(problems)
        return f"{restored}" + (f"; candidate kept on branch {kept}" if kept else "")

    _, uncached = pipeline_outputs(rootp)
    candidate_paths = ["dvc.lock", PARAMS_FILE, data_path, f"{data_path}.dvc"]
    try:
        # ---- candidate: refresh, reproduce, gate
        try:
            refresh_data(str(rootp))
            if overrides:  # under DVC's lock, as the compress flow edits params (WorkspaceBusy if a run is there)
                with workspace_lock(rootp):
                    apply_to_params_file(rootp / PARAMS_FILE, None, overrides)
            result["ran"] = [r.stage for r in (reproduce_stage(name, str(rootp)) for name in STAGES) if r.ran]
            logger.info("recomputed: %s", ", ".join(result["ran"]) or "nothing (all stages cached)")
            changes_artifact(rootp, "retrain-changes")
            metrics = Metrics.read(rootp)
            report = check_gates(str(rootp), model_name, stage, significance, max_regression)
        except WorkspaceBusy as exc:  # another run holds the workspace: it is theirs, nothing here to restore
            pending = False
            return finish(Failed, "Failed", f"not promoted: {_short(exc)}; production unchanged ({prod_now})")
        except Exception as exc:
            _log_unexpected(logger, exc)
            return finish(Failed, "Failed", f"not promoted: {_short(exc)}; production unchanged ({prod_now}); {give_up(_short(exc))}")
        result["gates"], result["comparison"] = report.gates, report.comparison
        for note in report.notes:
            logger.info(note)
        failed = [g for g in report.gates if not g.passed]
        if failed:
            reason = "; ".join(_gate_reason(g, report.comparison) for g in failed)
            return finish(Failed, "Rejected", f"not promoted: {reason}; production unchanged ({prod_now}); {give_up(reason)}")
        if not promote:
            return finish(Completed, "Evaluated", f"every gate passed; not promoted (promote=false); production unchanged ({prod_now}); "
                                                  f"{give_up('promote=false')}")

        # ---- publish: everything that can fail before production moves
        final = metrics[report.final_variant]
        try:
            result["published"] = publish(str(rootp), remote)
            commit = registry.candidate_commit(rootp, candidate_paths, f"retrain: {model_name} candidate", force=uncached)
            result["candidate"] = commit
            if pub.has_git_remote(rootp, git_remote):
                branch = registry.branch(rootp)
                if branch is None:
                    raise PromotionFailed(f"HEAD is detached: check out the branch {git_remote} should receive the candidate")
                missing = pub.missing_tags(rootp, git_remote, registry.registry_tags(rootp, model_name))
                push_refs(str(rootp), git_remote, [f"{commit}:refs/heads/{branch}", *(f"refs/tags/{t}" for t in missing)])
            else:
                logger.warning("no git remote %r: the candidate commit and the registry's tags stay local", git_remote)
        except Exception as exc:
            _log_unexpected(logger, exc)
            return finish(Failed, "Failed", f"not promoted: {_short(exc)}; production unchanged ({prod_now}); {give_up(_short(exc))}")
        registry.advance(rootp, commit, start)  # the remote has it: it is this branch's next commit
        pending = False

        # ---- promote: the last step; rolled back if the remote does not take it
        if before is not None and registry.same_model(rootp, before.commit, commit):
            result["version"] = before.version
            return finish(Completed, "Unchanged", f"{before.tag} already in {stage}: nothing new to promote; {result['published']}")
        record = {"final_variant": report.final_variant, "path": final.path, "metrics": final.model_dump(exclude_none=True),
                  "gates": [g.model_dump() for g in report.gates],
                  "comparison": report.comparison.model_dump() if report.comparison else None}
        version, created = assign(str(rootp), model_name, stage, record, commit)
        if pub.has_git_remote(rootp, git_remote):
            try:
                push_refs(str(rootp), git_remote, [f"refs/tags/{t}" for t in created])
            except Exception as exc:
                tags = registry.registry_tags(rootp, model_name)
                arrived = pub.remote_refs(rootp, git_remote, [f"refs/tags/{t}" for t in created]) if _reachable(rootp, git_remote) else {}
                if any(arrived.get(f"refs/tags/{t}") != tags[t] for t in created):
                    registry.delete_tags(rootp, created)
                    return finish(Failed, "Failed", f"not promoted: {_short(exc)}; the {stage} assignment was rolled back, production "
                                                    f"unchanged ({prod_now}); the candidate is committed ({commit[:10]}) and the next run "
                                                    "promotes it")
        result.update(version=version, promoted=True)
        return finish(Completed, "Promoted", f"promoted {model_name}@{version} to {stage} (was: {prod_now}); {result['published']}")
    finally:
        if pending:  # interrupted (SIGTERM, cancellation) before a decision: leave the workspace as it was
            snapshot.restore()
        snapshot.close()


def _log_unexpected(logger, exc: Exception) -> None:  # noqa: ANN001 - a Prefect run logger
    """A traceback for what is neither a clear error of ours nor of DVC (tasks log their own)."""
    from dvc.exceptions import DvcException

    if not isinstance(exc, ShrinkflowError | DvcException):
        logger.error("unexpected error: %s", _short(exc), exc_info=exc)


def _short(exc: BaseException) -> str:
    """The first line of an error, for a state message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _reachable(root: Path, git_remote: str) -> bool:
    from flows.ops.registry import git

    return git(root, "ls-remote", "--heads", git_remote, check=False).returncode == 0


def queue(deployment: str = "retrain/nightly", root: str = ".", **parameters: Any):
    """Validate the parameters and the params edits they carry, then queue a run (no waiting).

    Prefect accepts a run with an unknown or mistyped parameter and only fails it at run
    time; this rejects it before anything is queued.
    """
    from prefect.deployments import run_deployment

    from shrinkflow.errors import ParamsError

    allowed = set(retrain.parameters.properties)
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise ParamsError(f"unknown retrain parameter(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        retrain.validate_parameters({"root": root, **parameters})
    except Exception as exc:  # prefect's ParameterTypeError wraps pydantic's errors
        raise ParamsError(f"invalid retrain parameters: {exc}") from None
    rootp = Path(root)
    load_params(rootp / PARAMS_FILE, parameters.get("overrides") or [], root=rootp)  # params edits too
    return run_deployment(deployment, parameters={"root": root, **parameters}, timeout=0)
