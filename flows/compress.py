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
from flows.ops.dvcrepo import WorkspaceBusy, workspace_lock
from schemas.metrics import Metrics
from schemas.outputs import read_manifest
from schemas.paths import STAGES
from shrinkflow.config import PARAMS_FILE, apply_to_params_file
from shrinkflow.io import atomic_path
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
    params fail the run before any stage starts. A run that fails puts params.yaml back
    as it was (stages that had already run stay recorded in dvc.lock with the edited
    params, so `dvc status` shows them as changed: the truth).
    """
    rootp = Path(root).resolve()
    params_path = rootp / PARAMS_FILE
    before = params_path.read_bytes() if params_path.is_file() else None
    if params_file or overrides:
        with workspace_lock(rootp):
            apply_to_params_file(params_path, Path(params_file) if params_file else None, overrides or [])
    try:
        results = [stage(name, str(rootp)) for name in STAGES]
    except BaseException:
        if before is not None and params_path.read_bytes() != before:
            _restore(params_path, before)
        raise
    metrics = Metrics.read(rootp)
    evaluation = results[-1].manifest
    verdict = "passed" if evaluation["passed"] else "FAILED: " + ", ".join(g["name"] for g in evaluation["gates"] if not g["passed"])
    create_markdown_artifact(
        key="compress-metrics",
        markdown=render_table(metrics) + f"\n\nGates: {verdict}\n",
        description="Variants side by side (reports/metrics.json)",
    )
    return results



def _restore(params_path: Path, before: bytes) -> None:
    """Put params.yaml back after a failed run (under the lock; left as it is if the workspace is busy)."""
    try:
        with workspace_lock(params_path.parent):
            with atomic_path(params_path) as tmp:
                tmp.write_bytes(before)
    except WorkspaceBusy as exc:
        get_run_logger().warning("params.yaml not restored: %s", exc)
