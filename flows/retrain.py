"""The retrain flow: refresh data → reproduce the chain → quality gates → publish → promote.

Scheduled nightly (``retrain/nightly`` in prefect.yaml). Every step leaves deciding to
the tool that owns it: DVC decides what to recompute (unchanged data → nothing runs), the
evaluate stage computes the configured gates, GTO holds which model is in production.

- refresh: bring ``data.path`` up to date (``dvc update`` for a DVC import, ``dvc add``
  for a DVC-tracked folder; a plain watched folder needs nothing) and say whether the
  data stage's inputs changed. Retried with backoff: sources can be remote.
- reproduce: the compress flow as a subflow, i.e. the same per-stage task.
- gates: evaluate's gates (reports/evaluate.json) plus "no regression vs production":
  the production model, read from DVC's cache at its registered commit, is scored on
  today's test split next to the candidate. Any failed gate fails the run with the
  reason, before anything is committed, pushed or tagged: production is unchanged.
- commit: dvc.lock, params.yaml and git-tracked data go into one commit, the candidate.
- publish: ``dvc push --run-cache`` to the DVC remote (retried with backoff), before the
  production tag moves, so a prod version is never missing from the remote.
- promote: GTO registers the commit as the next version (annotated tag carrying the
  metrics) and assigns it the ``prod`` stage; tags are pushed when ``origin`` exists.

Two runs must never share one workspace: the deployments use ``concurrency_limit: 1``
and ``shrinkflow serve`` caps the work pool at one run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from flows.compress import changes_artifact, compress
from flows.ops.dvcrepo import open_repo
from schemas.metrics import Metrics
from schemas.outputs import GateResult, read_manifest
from schemas.paths import StagePaths
from shrinkflow.config import PARAMS_FILE, load_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.io import write_text
from shrinkflow.report import quality_drop, render_table

#: GTO artifact names: lowercase letters, digits, dashes (and / for namespaces).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-/]*[a-z0-9])?$"


class GateFailed(ShrinkflowError):
    """A quality gate failed: the candidate is not promoted."""


class DataRefresh(BaseModel):
    path: str
    updated: list[str] = Field(description="DVC-tracked sources refreshed (dvc update / dvc add).")
    changed: bool = Field(description="True when the data stage's inputs differ from dvc.lock.")


class RetrainResult(BaseModel):
    ran: list[str] = Field(description="Stages DVC recomputed in this run.")
    gates: list[GateResult]
    version: str | None = Field(description="Version in production after the run.")
    promoted: bool = Field(description="True when this run moved production to a new version.")
    published: str


# ---------------------------------------------------------------------------- refresh


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def refresh_data(root: str) -> DataRefresh:
    """Update DVC-tracked data sources and report whether the data stage is out of date."""
    rootp = Path(root)
    params = load_params(rootp / PARAMS_FILE, root=rootp)
    rel = params.data.path
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
        changed = bool(repo.status(targets=["dvc.yaml:data"]))
    get_run_logger().info("data %s: %s", rel, "changed since dvc.lock" if changed else "unchanged")
    return DataRefresh(path=rel, updated=updated, changed=changed)


# ------------------------------------------------------------------------------ gates



def production_quality(root: Path, prod, qkey: str) -> tuple[float | None, str]:
    """Score the production model on the current test split; fall back to its recorded metric."""
    import dvc.api

    from schemas.params import trusted
    from shrinkflow.data import load_splits
    from shrinkflow.loading import load
    from shrinkflow.training import predict, quality

    rel = prod.record.get("path")
    try:
        if not rel:
            raise ShrinkflowError(f"{prod.tag} records no model path")
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / Path(rel).name  # keep the suffix: it selects the file format
            with dvc.api.open(rel, repo=str(root), rev=prod.commit, mode="rb") as src:
                dest.write_bytes(src.read())
            model = load(dest, trusted(load_params(root / PARAMS_FILE, root=root)))
        splits = load_splits(StagePaths(root).splits)
        X, y = splits.tensors("test")
        return quality(predict(model, X), y, splits.task), "re-scored on today's test split"
    except Exception as exc:  # an old model the current code cannot read: use what was recorded
        recorded = prod.record.get("metrics", {}).get(qkey)
        return (float(recorded) if recorded is not None else None), f"recorded at promotion ({type(exc).__name__}: {exc})"


@task(cache_policy=NO_CACHE)
def check_gates(root: str, name: str, stage: str, max_regression: float | None) -> tuple[list[GateResult], Metrics, list[str]]:
    """Evaluate's gates plus no-regression vs the model now in ``stage``; returns (gates, metrics, notes)."""
    from flows.ops.registry import in_stage

    rootp = Path(root)
    evaluation = read_manifest("evaluate", rootp)
    metrics = Metrics.read(rootp)
    gates = list(evaluation.gates)
    notes: list[str] = []
    final = metrics[evaluation.final_variant]
    qkey = final.quality_key
    prod = in_stage(rootp, name, stage)
    if max_regression is not None and prod is not None:
        prod_q, how = production_quality(rootp, prod, qkey)
        if prod_q is None:
            notes.append(f"no-regression gate skipped: {prod.tag} has no {qkey} ({how})")
        else:
            # accuracy: points lost; mse: relative increase. Both must stay <= max_regression.
            value = quality_drop(prod_q, final.quality, qkey, relative=qkey == "mse")
            gates.append(GateResult(name=f"no_regression_vs_{stage}", limit=max_regression, value=value, passed=value <= max_regression))
            notes.append(f"{stage} model {prod.tag}: {qkey} {prod_q:.4g} ({how}); candidate {final.quality:.4g}")
    elif prod is None:
        notes.append(f"no model in {stage!r} yet: nothing to compare against")
    return gates, metrics, notes


# ---------------------------------------------------------------------- commit, publish, promote


def uncached_outputs(root: Path) -> list[str]:
    """Outputs dvc.yaml marks ``cache: false`` (metrics, plots, reports): DVC expects git to hold them."""
    with open_repo(root) as repo:
        return sorted({out.def_path for stage in repo.index.stages for out in stage.outs if not out.use_cache})


@task(cache_policy=NO_CACHE)
def commit_candidate(root: str, name: str) -> str:
    """Commit what pins the candidate; return HEAD.

    dvc.lock and params.yaml pin the models (their files live in DVC's cache and remote);
    git-tracked data and the ``cache: false`` outputs (metrics, reports) go into git, so
    a fresh clone + ``dvc pull`` + ``dvc repro`` finds every stage up to date.
    """
    from flows.ops.registry import commit_paths, head

    rootp = Path(root)
    data_path = load_params(rootp / PARAMS_FILE, root=rootp).data.path
    made = commit_paths(rootp, ["dvc.lock", PARAMS_FILE, data_path, f"{data_path}.dvc"], f"retrain: {name} candidate",
                        force=uncached_outputs(rootp))
    get_run_logger().info("candidate %s (%s)", head(rootp)[:10], "new commit" if made else "already committed")
    return head(rootp)


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def publish(root: str, remote: str | None) -> str:
    """``dvc push --run-cache`` to ``remote`` (default: DVC's default remote)."""
    from flows.ops.publish import push_outputs

    result = push_outputs(Path(root), remote)
    if result.remote is None:
        get_run_logger().warning(result.describe())
    return result.describe()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5))
def push_tags(root: str, git_remote: str) -> bool:
    from flows.ops.publish import push_git

    return push_git(Path(root), git_remote)


@task(cache_policy=NO_CACHE)
def promote(root: str, name: str, stage: str, record: dict) -> tuple[str, bool]:
    """Register HEAD (if new) and assign ``stage``; returns (version, moved)."""
    from flows.ops.registry import in_stage, register_and_assign, same_model

    rootp = Path(root)
    before = in_stage(rootp, name, stage)
    if before is not None and same_model(rootp, before.commit):
        return before.version, False
    v = register_and_assign(rootp, record, name, stage)
    get_run_logger().info("promoted %s to %s (%s)", v.tag, stage, v.commit[:10])
    return v.version, True


# -------------------------------------------------------------------------------- flow


def _decision_markdown(metrics: Metrics, gates: list[GateResult], notes: list[str], decision: str) -> str:
    lines = [render_table(metrics), "", "| gate | value | limit | result |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {g.value:.4g} | {g.limit:g} | {'pass' if g.passed else '**FAIL**'} |" for g in gates]
    lines += ["", *(f"- {n}" for n in notes), "", f"**Decision:** {decision}", ""]
    return "\n".join(lines)


@flow(name="retrain")
def retrain(
    root: str = ".",
    overrides: list[str] | None = None,
    model_name: Annotated[str, Field(pattern=NAME_PATTERN, description="GTO artifact name of the model.")] = "shrinkflow",
    stage: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="GTO stage that serves production.")] = "prod",
    max_regression: Annotated[float | None, Field(ge=0, description="Allowed loss vs the production model (accuracy points, or relative MSE increase); null = no such gate.")] = 0.0,
    remote: str | None = None,
    git_remote: str = "origin",
) -> RetrainResult:
    """Retrain on fresh data and promote the result if it passes every gate.

    Args:
        root: the project (git + DVC repository).
        overrides: ``key=value`` params edits, written into params.yaml as the compress flow
            does; kept (and committed) when the candidate is promoted, undone when a gate fails.
        model_name: GTO artifact name; versions are tags ``NAME@vX.Y.Z``.
        stage: the GTO stage that means "in production".
        max_regression: allowed loss of the candidate vs the production model on today's test split.
        remote: DVC remote to publish to; default: the repository's default remote (none: skip).
        git_remote: git remote that receives the candidate commit and tags, if it exists.
    """
    logger = get_run_logger()
    rootp = str(Path(root).resolve())
    refresh_data(rootp)
    params_file = Path(rootp) / PARAMS_FILE
    params_before = params_file.read_text(encoding="utf-8")
    results = compress(root=rootp, overrides=overrides or [])
    changes_artifact(Path(rootp), "retrain-changes")
    ran = [r.stage for r in results if r.ran]
    logger.info("recomputed: %s", ", ".join(ran) or "nothing (all stages cached)")
    gates, metrics, notes = check_gates(rootp, model_name, stage, max_regression)
    for note in notes:
        logger.info(note)
    failed = [g for g in gates if not g.passed]
    if failed:
        reason = "; ".join(f"{g.name} = {g.value:.4g} (limit {g.limit:g})" for g in failed)
        create_markdown_artifact(key="retrain-decision", markdown=_decision_markdown(metrics, gates, notes, f"not promoted: {reason}"),
                                 description="Retrain: metrics, gates and decision")
        if overrides:  # a rejected candidate's params edits must not carry into the next scheduled run
            write_text(params_file, params_before)
        raise GateFailed(f"quality gate(s) failed, production unchanged: {reason}")
    commit_candidate(rootp, model_name)
    published = publish(rootp, remote)
    final = read_manifest("evaluate", Path(rootp)).final_variant
    record = {"final_variant": final, "path": metrics[final].path, "metrics": metrics[final].model_dump(exclude_none=True),
              "gates": [g.model_dump() for g in gates]}
    version, moved = promote(rootp, model_name, stage, record)
    if moved:
        push_tags(rootp, git_remote)
    decision = f"promoted {model_name}@{version} to {stage}" if moved else f"{model_name}@{version} already in {stage}: nothing new to promote"
    create_markdown_artifact(key="retrain-decision", markdown=_decision_markdown(metrics, gates, notes, decision + f"; {published}"),
                             description="Retrain: metrics, gates and decision")
    logger.info(decision)
    return RetrainResult(ran=ran, gates=gates, version=version, promoted=moved, published=published)


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
