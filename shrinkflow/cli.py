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
AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", help="Trust this Python module (e.g. mypkg.nets) when the file names a class of it (arch: module); repeatable."),
]


def _fail(exc: ShrinkflowError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="data | train_teacher | prune | quantize | distill | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage in the current directory (the command each dvc.yaml stage runs)."""
    from tasks.run import main as run_stage_command  # the stage's code lives in tasks/ (dvc.yaml lists it)

    raise typer.Exit(run_stage_command(name, params))


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


@app.command("params-doc")
def params_doc() -> None:
    """Print the params reference as markdown (docs/params.md is this output)."""
    from shrinkflow.paramdoc import params_reference

    typer.echo(params_reference(), nl=False)


@app.command()
def metrics(root: Annotated[Path, typer.Option(help="Project root.")] = Path(".")) -> None:
    """Print reports/metrics.json as a table."""
    from schemas.metrics import Metrics
    from schemas.paths import StagePaths
    from shrinkflow.report import render_table

    path = StagePaths(root).metrics
    if not path.is_file():
        typer.echo(f"error: {path} not found: run the pipeline first (dvc repro or shrinkflow run)", err=True)
        raise typer.Exit(2)
    typer.echo(render_table(Metrics.read(root)))


@app.command()
def changes(
    variant: Annotated[str | None, typer.Argument(help="teacher | pruned | quantized | student; default: all, side by side.")] = None,
    root: Annotated[Path, typer.Option(help="Project root.")] = Path("."),
) -> None:
    """Print what compression changed vs the teacher: flips, calibration, per-class damage (reports/changes)."""
    from schemas.changes import ChangesReport
    from schemas.paths import StagePaths
    from shrinkflow.changes import render_summary

    path = StagePaths(root).changes_json
    if not path.is_file():
        typer.echo(f"error: {path} not found: run the pipeline first (dvc repro or shrinkflow run)", err=True)
        raise typer.Exit(2)
    try:
        report = ChangesReport.read(root)
    except ValueError as exc:  # a damaged file, or one of another version (pydantic's errors are ValueErrors)
        typer.echo(f"error: {path} is not a changes report of this shrinkflow version ({exc.__class__.__name__}): "
                   "rerun the evaluate stage (dvc repro evaluate)", err=True)
        raise typer.Exit(2) from None
    if variant is not None and variant not in report.variants:
        typer.echo(f"error: no variant {variant!r} in {path}; variants: {', '.join(report.variants)}", err=True)
        raise typer.Exit(2)
    typer.echo(render_summary(report, variant))


@app.command()
def sensitivity(
    model: Annotated[Path | None, typer.Option(help="Model file to analyse; default: the teacher (models/train_teacher/model.pt).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sparsities: Annotated[str | None, typer.Option(help="Comma-separated, e.g. 0.5,0.9; default: prune.sensitivity_sparsities.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for sensitivity.json/.md/.png and curves.json.")] = Path("reports/sensitivity"),
) -> None:
    """Prune each layer alone at several sparsities; write and print validation quality per layer."""
    from schemas.params import trusted
    from schemas.paths import StagePaths
    from shrinkflow import sensitivity as sens
    from shrinkflow.config import load_params
    from shrinkflow.data import load_splits
    from shrinkflow.errors import ParamsError
    from shrinkflow.loading import load_model

    paths = StagePaths(Path.cwd())
    try:
        p = load_params(params) if sparsities is None or params.is_file() else None  # the params name trusted modules
        if sparsities is None:
            levels = list(p.prune.sensitivity_sparsities)
        else:
            try:
                levels = [float(s) for s in sparsities.split(",") if s.strip()]
            except ValueError:
                raise ParamsError(f"--sparsities: expected numbers separated by commas, got {sparsities!r}") from None
            if not levels or any(not 0 < s < 1 for s in levels):
                raise ParamsError(f"--sparsities: every value must be in (0, 1), got {sparsities!r}")
        net, _ = load_model(model or paths.model("train_teacher"), trusted(p) if p else ())
        table = sens.analyze(net, load_splits(paths.splits), levels)
    except ShrinkflowError as exc:
        _fail(exc)
    sens.write_reports(table, out)
    typer.echo((out / sens.MARKDOWN).read_text(encoding="utf-8"))


#: Where `shrinkflow run` writes its full log (Prefect, DVC and every stage's output), under the project root.
RUN_LOG = Path(".shrinkflow") / "logs" / "run.log"


@app.command()
def run(
    params: Annotated[Path | None, typer.Option("--params", "-p", help="Copy this params file into params.yaml first.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key, e.g. --set prune.sparsity=0.9 (written into params.yaml).")] = None,
    root: Annotated[Path, typer.Option(help="Project root (git + DVC repo).")] = Path("."),
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral server unless PREFECT_API_URL is set).

    The terminal shows one line per stage, the metrics table and the gates; the full log
    (Prefect, DVC, every stage's output) goes to .shrinkflow/logs/run.log. A failing stage
    ends the run with its own message and exit status (2 for bad input); a workspace busy
    with another run exits 75 without changing anything; a failed gate exits 1.
    """
    from shrinkflow.config import PARAMS_FILE, load_params

    try:  # reject bad params before paying for Prefect's start-up
        load_params(params or root / PARAMS_FILE, set_ or [], root=root)
    except ShrinkflowError as exc:
        _fail(exc)
    from flows.ops.dvcrepo import workspace_lock

    try:
        with workspace_lock(root):  # busy: refuse now, before paying for Prefect (the flow takes the lock again)
            pass
    except ShrinkflowError as exc:
        _fail(exc)
    log_path = (root / RUN_LOG).resolve()
    _log_to_file(log_path)
    from flows.compress import compress
    from schemas.metrics import Metrics
    from shrinkflow.report import render_table

    try:
        results = compress(root=str(root.resolve()), params_file=str(params) if params else None, overrides=set_ or [])
    except ShrinkflowError as exc:
        logging.getLogger("shrinkflow.run").error("run failed: %s", exc)
        typer.echo(f"error: {exc}\n(full log: {log_path})", err=True)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # not a user error: the traceback is in the log, the terminal gets one line
        logging.getLogger("shrinkflow.run").exception("run crashed")
        typer.echo(f"error: {type(exc).__name__}: {exc}\n(traceback in {log_path})", err=True)
        raise typer.Exit(1) from None
    typer.echo(render_table(Metrics.read(root)))
    evaluation = results[-1].manifest
    for g in evaluation["gates"]:
        detail = f" ({g['detail']})" if g.get("detail") and not g["passed"] else ""
        typer.echo(f"gate {g['name']}: {g['value']:.4g} (limit {g['limit']:.4g}) {'pass' if g['passed'] else 'FAIL'}{detail}")
    if not evaluation["passed"]:
        raise typer.Exit(1)


def _log_to_file(path: Path) -> None:
    """Everything (Prefect, DVC, the stages) into ``path``; on the terminal only shrinkflow's progress lines.

    Prefect reads its logging settings when first imported, so this runs before that.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # Prefect's console: quiet
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dvc")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    # Append mode: Prefect's logging set-up closes existing handlers, and a closed handler in
    # "w" mode never reopens (its records would be lost).
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    progress = logging.getLogger("shrinkflow.run")
    terminal = logging.StreamHandler(sys.stdout)
    terminal.setFormatter(logging.Formatter("%(message)s"))
    terminal.addFilter(lambda record: record.levelno < logging.ERROR)  # errors: one line, printed by `run`
    progress.addHandler(terminal)
    progress.setLevel(logging.INFO)


@app.command()
def serve(
    root: Annotated[Path, typer.Option(help="Project root holding prefect.yaml.")] = Path("."),
    host: Annotated[str, typer.Option(help="Address the server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Server port (UI and API).")] = 4200,
    home: Annotated[Path | None, typer.Option(help="PREFECT_HOME (SQLite database, logs); default: Prefect's.")] = None,
    poll: Annotated[float | None, typer.Option(help="Worker poll interval in seconds (PREFECT_WORKER_QUERY_SECONDS).")] = None,
) -> None:
    """Start a local Prefect server, the process work pool, the deployments and a worker.

    SIGINT (Ctrl-C) or SIGTERM stops the worker and its flow runs, then the server; a
    second signal sends SIGKILL after a few seconds. Exit code 0 after a requested stop.
    """
    from flows.ops.serve import serve as run_serve

    try:
        run_serve(root, home.resolve() if home else None, host, port, poll)
    except ShrinkflowError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # only before serve's own handlers were installed: nothing was started yet
        typer.echo("interrupted before anything was started.", err=True)
        raise typer.Exit(130) from None


@app.command()
def sweep(
    file: Annotated[Path | None, typer.Argument(help="Sweep file (see examples/sweep.yaml).")] = None,
    root: Annotated[Path, typer.Option(help="Project root (git + DVC repo).")] = Path("."),
    address: Annotated[str | None, typer.Option(help="Dask scheduler address (overrides cluster.address).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="LocalCluster workers (overrides cluster.workers).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the sweep's Optuna study: finished trials are kept, unfinished ones rerun.")
    ] = False,
    schema_: Annotated[bool, typer.Option("--schema", help="Print the sweep file's JSON Schema and exit.")] = False,
) -> None:
    """Search configs with Optuna, each trial an isolated run on Dask; write results, the Pareto frontier and the chosen params.

    Exit 0 when a trial met the criterion (its params are in <output>/best-params.yaml), 1 when none did,
    2 for a bad sweep file or a study that exists (use --resume).
    """
    if schema_:
        from schemas.sweep import Sweep

        typer.echo(json.dumps(Sweep.model_json_schema(by_alias=True), indent=2))
        return
    if file is None:
        typer.echo("error: give a sweep file, e.g. shrinkflow sweep examples/sweep.yaml", err=True)
        raise typer.Exit(2)
    from flows.ops.sweep import plan, preflight

    try:  # reject a bad sweep, or a study that cannot be opened as asked, before paying for Prefect and Dask start-up
        p = plan(file, root, address=address, workers=workers)
        preflight(p, resume)
    except ShrinkflowError as exc:
        _fail(exc)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.sweep import run_sweep

    try:
        summary = run_sweep(file, root, address=address, workers=workers, resume=resume, checked=p)
    except ShrinkflowError as exc:
        _fail(exc)
    typer.echo((p.out / "results.md").read_text())
    typer.echo(f"results: {p.out} (results.csv, results.md, pareto.png, importances.png, pareto.json)")
    typer.echo(f"study: {summary['study']['storage']} (browse: {summary['study']['dashboard']})")
    if summary["chosen"] is None:
        raise typer.Exit(1)
    typer.echo(f"chosen: trial {summary['chosen']['trial']} → {summary['best_params']}")


@app.command()
def pack(
    model: Annotated[Path, typer.Argument(help="Model file to pack (.pt, or .sfz to repack).")],
    out: Annotated[Path, typer.Argument(help="Packed file to write, e.g. model.sfz.")],
    no_huffman: Annotated[bool, typer.Option("--no-huffman", help="Fixed-width streams (to see what entropy coding adds).")] = False,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Inputs (.npy, or .npz with X) whose predicted classes the file must keep: biases, codebooks and "
            "other float values are then stored as float16 wherever every one of these predictions stays the same. "
            "Without it the file is lossless.",
        ),
    ] = None,
    allow: AllowOpt = None,
) -> None:
    """Pack a model into the Deep Compression format (sparse positions, shared weights, Huffman); print where the bytes go."""
    from shrinkflow.loading import load_model, pack_file

    try:
        ref = None
        if reference is not None:
            _, header = load_model(model, allow or [])
            ref = _read_inputs(reference, header.input_shape)
        rep = pack_file(model, out, entropy=not no_huffman, allow=allow or [], reference=ref)
    except ShrinkflowError as exc:
        _fail(exc)
    typer.echo(f"{out}: {rep.size_bytes:,} bytes (packed format version {rep.version}); {model}: {model.stat().st_size:,} bytes\n")
    typer.echo("\n".join(rep.markdown()))
    if rep.checked:
        typer.echo(
            f"\nfloat16: {', '.join(rep.rounded) or 'none'} (every predicted class on {rep.checked:,} reference inputs kept)"
        )


def _read_inputs(path: Path, input_shape: list[int]):
    """Rows of a .npy array or of the array X in an .npz, as a float32 tensor shaped [N, *input_shape]."""
    import numpy as np
    import torch

    from shrinkflow.errors import InputError

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            X = loaded
        else:
            with loaded:
                X = loaded["X"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: expected a .npy array or an .npz with array 'X' ({exc})") from exc
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise InputError(f"{path}: holds {X.dtype} values, not numbers: give the model numeric inputs")
    X = X.astype(np.float32)
    if X.ndim < 1 or len(X) == 0:
        raise InputError(f"{path}: no rows (shape {list(X.shape)})")
    if not np.isfinite(X).all():
        raise InputError(f"{path}: contains NaN or infinite values")
    if list(X.shape[1:]) != list(input_shape):
        if X.ndim >= 1 and int(np.prod(X.shape[1:])) == int(np.prod(input_shape)):
            X = X.reshape(len(X), *input_shape)
        else:
            raise InputError(f"{path}: rows shaped {list(X.shape[1:])}, the model takes {input_shape}")
    return torch.from_numpy(X)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model file (.pt or packed .sfz).")],
    inputs: Annotated[Path, typer.Argument(help=".npy array, or .npz with array X, shaped [N, *input_shape].")],
    allow: AllowOpt = None,
) -> None:
    """Print the model's prediction for each input row (class, or regression outputs)."""
    import torch

    from shrinkflow.loading import load_model

    try:
        net, header = load_model(model, allow or [])
        X = _read_inputs(inputs, header.input_shape)
        with torch.inference_mode():
            out = net(X).float()
    except ShrinkflowError as exc:
        _fail(exc)
    if header.task == "classification":
        for c in out.argmax(1).tolist():
            typer.echo(str(c))
    else:
        for row in out.tolist():
            typer.echo(" ".join(f"{v:.6g}" for v in row))


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="Model file (.pt or packed .sfz).")],
    out: Annotated[Path, typer.Argument(help="ONNX file to write.")],
    check: Annotated[bool, typer.Option(help="Check parity and latency in onnxruntime on the test split (data/prepared).")] = True,
    threads: Annotated[int, typer.Option(help="Threads for both runtimes in the latency check.")] = 1,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize the ONNX graph with onnxruntime's dynamic int8 quantizer.")] = False,
    allow: AllowOpt = None,
) -> None:
    """Export a model to ONNX (dynamo exporter, one file) and check it against PyTorch."""
    from schemas.paths import StagePaths
    from shrinkflow.export import check_onnx, export_onnx
    from shrinkflow.loading import load_model

    try:
        net, header = load_model(model, allow or [])
        info = export_onnx(net, header, out, int8=int8)
    except ShrinkflowError as exc:
        _fail(exc)
    typer.echo(f"{out}: {info['size_bytes']:,} bytes, exported {info['exported_as']}")
    splits_path = StagePaths(Path.cwd()).splits
    if check and splits_path.is_file():
        from shrinkflow.data import load_splits

        X, y = load_splits(splits_path).tensors("test")
        res = check_onnx(out, net, X, y if header.task == "classification" else None, threads=threads)
        typer.echo(json.dumps(res, indent=2))
    elif check:
        typer.echo("parity check skipped: no data/prepared/splits.npz here (run the data stage first)")


def main() -> None:
    # `arch: module` names classes "importable from the project root", which is the
    # working directory of every stage command; console scripts don't put it on sys.path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app()


if __name__ == "__main__":
    main()
