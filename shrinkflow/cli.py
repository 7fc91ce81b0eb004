"""The ``shrinkflow`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from shrinkflow.errors import ShrinkflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Declarative, reproducible model compression.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file.")]


def _fail(exc: ShrinkflowError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="data | train_teacher | prune | quantize | distill | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage in the current directory (the command each dvc.yaml stage runs)."""
    from shrinkflow.config import load_params
    from shrinkflow.paths import STAGES
    from shrinkflow.stages import run_stage

    if name not in STAGES:
        typer.echo(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        out = run_stage(name, load_params(params), Path.cwd())
    except ShrinkflowError as exc:
        _fail(exc)
    typer.echo(f"{name}: done ({type(out).__name__} → reports/{name}.json)")


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Params file to check.")] = Path("params.yaml")) -> None:
    """Check a params file; exit 2 with every problem named by its key path."""
    from shrinkflow.config import load_params

    try:
        load_params(file)
    except ShrinkflowError as exc:
        _fail(exc)
    typer.echo(f"{file}: valid")


@app.command()
def schema() -> None:
    """Print the JSON Schema of params.yaml (for editors and docs)."""
    from schemas.params import Params

    typer.echo(json.dumps(Params.model_json_schema(by_alias=True), indent=2))


@app.command()
def metrics(root: Annotated[Path, typer.Option(help="Project root.")] = Path(".")) -> None:
    """Print reports/metrics.json as a table."""
    from shrinkflow.paths import StagePaths
    from tasks.evaluate import render_table

    path = StagePaths(root).metrics
    if not path.is_file():
        typer.echo(f"error: {path} not found: run the pipeline first (dvc repro or shrinkflow run)", err=True)
        raise typer.Exit(2)
    typer.echo(render_table(json.loads(path.read_text())))


@app.command()
def run(
    params: Annotated[Path | None, typer.Option("--params", "-p", help="Copy this params file into params.yaml first.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key, e.g. --set prune.sparsity=0.9 (written into params.yaml).")] = None,
    root: Annotated[Path, typer.Option(help="Project root (git + DVC repo).")] = Path("."),
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral server unless PREFECT_API_URL is set)."""
    from shrinkflow.config import PARAMS_FILE, load_params

    try:  # reject bad params before paying for Prefect's start-up
        load_params(params or root / PARAMS_FILE, set_ or [], root=root)
    except ShrinkflowError as exc:
        _fail(exc)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.compress import compress
    from shrinkflow.paths import StagePaths
    from tasks.evaluate import render_table

    try:
        results = compress(root=str(root.resolve()), params_file=str(params) if params else None, overrides=set_ or [])
    except ShrinkflowError as exc:
        _fail(exc)
    for r in results:
        typer.echo(f"  {r.stage:<14} {'ran' if r.ran else 'cached'}")
    typer.echo(render_table(json.loads(StagePaths(root).metrics.read_text())))
    evaluation = results[-1].manifest
    for g in evaluation["gates"]:
        typer.echo(f"gate {g['name']}: {g['value']:.4g} (limit {g['limit']:g}) {'pass' if g['passed'] else 'FAIL'}")
    if not evaluation["passed"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
