"""The compress flow: one Prefect task per stage, in chain order.

Each task asks DVC to reproduce exactly its stage; DVC's cache is the only cache
(no Prefect result caching), so a stage whose inputs did not change is skipped
whichever front door ran it, and both leave the same dvc.lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.dvc_stage import reproduce
from flows.ops.dvcrepo import Snapshot, WorkspaceBusy, workspace_lock
from schemas.changes import ChangesReport
from schemas.metrics import Metrics
from schemas.outputs import read_manifest
from schemas.paths import STAGES, StagePaths
from shrinkflow.changes import render_summary
from shrinkflow.config import PARAMS_FILE, apply_to_params_file, read_yaml
from shrinkflow.errors import ShrinkflowError
from shrinkflow.report import render_table


class StageResult(BaseModel):
    stage: str
    ran: bool
    manifest: dict


#: Plain progress lines ("prune: ran"), for terminals: `shrinkflow run` prints this logger alone.
progress = logging.getLogger("shrinkflow.run")


@task(cache_policy=NO_CACHE, task_run_name="{name}", retries=0)
def stage(name: str, root: str) -> StageResult:
    """Reproduce stage ``name`` through DVC and return its manifest."""
    progress.info("  %-14s running ...", name)
    ran = reproduce(Path(root), name, log=get_run_logger().info)  # the stage's output reaches the run's logs
    get_run_logger().info("%s: %s", name, "ran" if ran else "cached (inputs unchanged)")
    progress.info("  %-14s %s", name, "ran" if ran else "cached")
    return StageResult(stage=name, ran=ran, manifest=read_manifest(name, Path(root)).model_dump(mode="json"))


def changes_artifact(root: Path, key: str) -> None:
    """What compression changed (reports/changes) as a markdown artifact of the running flow.

    The summary table and per-class changes are in the artifact; the pictures are linked
    as files of the project (``file://`` links: open them on the machine that ran the flow).
    """
    root = Path(root).resolve()
    if not StagePaths(root).changes_json.is_file():
        get_run_logger().warning("no %s: nothing to show in the %s artifact", StagePaths(root).changes_json, key)
        return
    report = ChangesReport.read(root)
    gates = read_manifest("evaluate", root).gates
    rows = ["| gate | value | limit | result | detail |", "|---|---|---|---|---|"]
    rows += [f"| {g.name} | {g.value:.4g} | {g.limit:.4g} | {'pass' if g.passed else '**FAIL**'} | {g.detail or ''} |" for g in gates]
    create_markdown_artifact(
        key=key,
        markdown=render_summary(report, link=lambda p: (root / p).as_uri()) + "\n\n" + "\n".join(rows) + "\n",
        description="What compression changed vs the teacher: flips, calibration, per-class accuracy (reports/changes)",
    )


@flow(name="compress")
def compress(root: str = ".", params_file: str | None = None, overrides: list[str] | None = None) -> list[StageResult]:
    """Run the whole chain in the project at ``root``.

    Args:
        root: the project (a git + DVC repository with dvc.yaml and params.yaml).
        params_file: copy this params file into ``root/params.yaml`` first.
        overrides: ``key=value`` edits written into ``root/params.yaml`` first,
            as ``dvc exp run -S`` does, so dvc.lock records what ran.

    params.yaml is edited only while holding DVC's repository lock (refused at once,
    ``WorkspaceBusy``, when a `dvc repro` is running there), after validation: invalid
    params fail the run before any stage starts. A run that fails leaves the workspace as
    it was before it: params.yaml, dvc.lock and every pipeline output (DVC deletes a
    stage's outputs before running it; the last good ones come back from DVC's cache).
    What the stages that finished computed stays in DVC's run-cache, so rerunning after a
    fix restores it instead of recomputing.
    """
    rootp = Path(root).resolve()
    params_path = rootp / PARAMS_FILE
    snapshot = Snapshot.take(rootp, _data_path(params_path))
    try:
        if params_file or overrides:
            with workspace_lock(rootp):
                apply_to_params_file(params_path, Path(params_file) if params_file else None, overrides or [])
        try:
            results = [stage(name, str(rootp)) for name in STAGES]
        except WorkspaceBusy:
            raise  # another run holds the workspace: it is theirs to change, not ours to restore
        except BaseException:
            problems = snapshot.restore()
            if problems:
                get_run_logger().warning("the workspace was not fully restored: %s", "; ".join(problems))
            raise
    finally:
        snapshot.close()
    metrics = Metrics.read(rootp)
    evaluation = results[-1].manifest
    verdict = "passed" if evaluation["passed"] else "FAILED: " + ", ".join(g["name"] for g in evaluation["gates"] if not g["passed"])
    create_markdown_artifact(
        key="compress-metrics",
        markdown=render_table(metrics) + f"\n\nGates: {verdict}\n",
        description="Variants side by side (reports/metrics.json)",
    )
    changes_artifact(rootp, "compress-changes")
    return results



def _data_path(params_path: Path) -> str:
    """data.path of a params file as written (its .dvc file, if any, is part of the workspace to keep)."""
    from schemas.data import DigitsData

    try:
        data = (read_yaml(params_path) or {}).get("data") or {}
    except ShrinkflowError:  # missing or unreadable: the run fails on it before changing anything
        data = {}
    return str(data.get("path") or DigitsData.model_fields["path"].default)
