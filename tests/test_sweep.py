"""Sweeps: the sweep-file schema, the Pareto frontier, the Optuna search (on fake trials), results, one real trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST, make_project, set_params

from flows.ops.sweep import Scheduler, load_sweep, plan, write_results
from flows.ops.trials import failure_reason
from schemas.sweep import Range, TrialResult
from shrinkflow.config import load_params
from shrinkflow.errors import InputError, ParamsError
from shrinkflow.report import quality_drop
from shrinkflow.search import decode_choice, encode_choices, grid_points, pareto_front, space_values


def write_sweep(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ Pareto


def test_pareto_front_on_a_hand_made_table():
    rows = [
        {"accuracy": 0.95, "size_bytes": 100, "latency_ms_b1": 1.0},  # 0: best accuracy
        {"accuracy": 0.90, "size_bytes": 50, "latency_ms_b1": 1.0},  # 1: smaller
        {"accuracy": 0.90, "size_bytes": 60, "latency_ms_b1": 1.0},  # 2: dominated by 1
        {"accuracy": 0.80, "size_bytes": 50, "latency_ms_b1": 0.5},  # 3: fastest
        {"accuracy": 0.80, "size_bytes": 50, "latency_ms_b1": 0.6},  # 4: dominated by 3
        {"accuracy": 0.95, "size_bytes": 100, "latency_ms_b1": 1.0},  # 5: a copy of 0: copies stay
        {"accuracy": float("nan"), "size_bytes": 1, "latency_ms_b1": 0.1},  # 6: diverged: never on the front
        {"size_bytes": 1, "latency_ms_b1": 0.1},  # 7: failed trial, no metrics
        {"accuracy": 0.70, "size_bytes": 200, "latency_ms_b1": 2.0},  # 8: dominated by everything
    ]
    objectives = {"accuracy": "max", "size_bytes": "min", "latency_ms_b1": "min"}
    assert pareto_front(rows, objectives) == [0, 1, 3, 5]
    # Two objectives only: latency no longer saves row 3 over row 1.
    assert pareto_front(rows, {"accuracy": "max", "size_bytes": "min"}) == [0, 1, 5]
    # Regression: lower MSE is better.
    mse = [{"mse": 0.1, "size_bytes": 10}, {"mse": 0.2, "size_bytes": 5}, {"mse": 0.3, "size_bytes": 6}]
    assert pareto_front(mse, {"mse": "min", "size_bytes": "min"}) == [0, 1]


def test_quality_drop_absolute_and_relative():
    assert quality_drop(0.9, 0.88, "accuracy", relative=False) == pytest.approx(0.02)
    assert quality_drop(0.8, 0.76, "accuracy", relative=True) == pytest.approx(0.05)
    assert quality_drop(0.10, 0.12, "mse", relative=True) == pytest.approx(0.2)
    assert quality_drop(0.9, 0.95, "accuracy", relative=False) < 0  # better than the teacher


# ------------------------------------------------------------------ expansion


def test_grid_and_random_expansion():
    values = space_values({"prune.sparsity": [0.5, 0.9], "distill.epochs": Range(low=1, high=5, integer=True, steps=3)})
    assert values == {"prune.sparsity": [0.5, 0.9], "distill.epochs": [1, 3, 5]}
    points = grid_points(values)
    assert len(points) == 6 and points[0] == {"prune.sparsity": 0.5, "distill.epochs": 1}
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 6
    assert Range(low=1e-3, high=1e-1, log=True, steps=3).values() == [0.001, 0.01, 0.1]

    # Lists holding specs are stored by Optuna as JSON strings, all of them, and read back as written.
    student = ["compressed", {"arch": "mlp", "hidden": [32]}]
    codes = encode_choices(student)
    assert codes == ['"compressed"', '{"arch": "mlp", "hidden": [32]}']
    assert [decode_choice(c, student) for c in codes] == student
    assert encode_choices([0.5, 0.9]) == [0.5, 0.9]


# ------------------------------------------------------------------ sweep file validation


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("sweep") / "proj")
    set_params(root, FAST)
    return root


def test_sweep_file_errors_name_the_key(tmp_path, proj):
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5]}, "serach": {"mode": "grid"}})
    with pytest.raises(ParamsError, match=r"serach: unknown key"):
        load_sweep(bad)
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5]}, "search": {"mode": "bayes"}})
    with pytest.raises(ParamsError, match=r"search.mode: unknown value 'bayes'"):
        load_sweep(bad)
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": {"low": 0.9, "high": 0.5}}})
    with pytest.raises(ParamsError, match=r"space.prune.sparsity"):
        load_sweep(bad)
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5]}, "set": {"prune.sparsity": 0.9}})
    with pytest.raises(ParamsError, match=r"both in `set` and in `space`"):
        load_sweep(bad)
    # Values are checked against the params schema before anything runs, naming the key.
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5, 1.5]}})
    with pytest.raises(ParamsError, match=r"space.prune.sparsity: value 1.5 is not valid(.|\n)*prune.sparsity"):
        plan(bad, proj)
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsty": [0.5]}})
    with pytest.raises(ParamsError, match=r"prune.sparsty: unknown key"):
        plan(bad, proj)
    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5]}, "objective": "latency_b64"})
    with pytest.raises(ParamsError, match=r"batch size 64 in evaluate.batch_sizes"):
        plan(bad, proj)


def test_example_sweep_file_is_valid(proj):
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"
    p = plan(example, proj)
    assert p.sweep.search.mode == "auto" and p.sweep.search.sampler == "tpe"
    assert p.out == proj / "sweeps" / p.sweep.name
    assert p.storage == f"sqlite:///{p.out / 'study.db'}"


def test_nsga2_cannot_be_asked_to_prune(tmp_path, proj):
    f = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5]}, "search": {"mode": "auto", "sampler": "nsga2"},
                                         "early_stop": {"enabled": True}})
    with pytest.raises(ParamsError, match=r"early_stop.enabled: Optuna cannot prune(.|\n)*multi-objective"):
        plan(f, proj)


# ------------------------------------------------------------------ the search on Optuna (fake trials, real study)


def fake(index: int, point: dict, acc: float, size: int, teacher: float = 0.95, status: str = "done") -> TrialResult:
    common = {"agreement": 0.9, "params": 100, "nonzero_params": 50, "sparsity": 0.5, "layer_sparsity": {}, "macs": None,
              "format": "fp32", "path": "m.pt", "speedup_b1": 1.0}
    metrics = {"accuracy": acc, "size_bytes": size, "latency_ms_b1": size / 1000, "compression_ratio": 10_000 / max(size, 1), **common}
    teacher_row = {"accuracy": teacher, "size_bytes": 10_000, "latency_ms_b1": 10.0, "compression_ratio": 1.0, **common}
    done = status == "done"
    return TrialResult(index=index, point=point, overrides=[f"{k}={v}" for k, v in point.items()], status=status,
                       reason=None if done else "distill: boom", pid=1, host="h", seconds=1.0,
                       metrics=metrics if done else None, teacher=teacher_row if done else None)


class Done:
    """A future that is already done (the scheduler's view of a finished task)."""

    def __init__(self, value: TrialResult):
        self.value = value

    def result(self) -> TrialResult:
        return self.value


def toy(spec) -> TrialResult:
    """More sparsity = a smaller file; accuracy falls off past 0.9 (a cliff, as on real models)."""
    sp = spec.point["prune.sparsity"]
    return fake(spec.index, spec.point, acc=0.95 - (0.0 if sp <= 0.9 else 0.2), size=int(10_000 * (1 - sp)))


def run_fake(p, evaluate=toy, resume: bool = False):
    """Run the real scheduler and Optuna study; trials are ``evaluate(spec)``, run at once."""
    calls: list[dict] = []

    def submit(spec):
        calls.append(spec.point)
        return Done(evaluate(spec))

    def teacher(spec):
        return Done(TrialResult(index=spec.index, point=spec.point, status="done", pid=1, host="h", seconds=0.0))

    summary = Scheduler(p, submit, teacher, first_done=lambda futures: futures[0], log=lambda _: None, resume=resume).run()
    return summary, calls


SPARSITY = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]


def test_grid_runs_every_point_once_and_keeps_the_study(tmp_path, proj):
    import optuna

    f = write_sweep(tmp_path / "s.yaml", {"name": "grid", "output": str(tmp_path / "out"), "criterion": {"max_drop": 0.02},
                                         "space": {"prune.sparsity": [0.5, 0.9, 0.98], "distill.temperature": [2.0, 4.0]}})
    p = plan(f, proj)
    summary, calls = run_fake(p)
    assert sorted((c["prune.sparsity"], c["distill.temperature"]) for c in calls) == sorted(
        (a, b) for a in (0.5, 0.9, 0.98) for b in (2.0, 4.0))
    assert summary["done"] == 6 and summary["chosen"]["point"]["prune.sparsity"] == 0.9
    # The study holds every trial with its result and the criterion as a constraint.
    study = optuna.load_study(study_name="grid", storage=p.storage)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.best_trial.user_attrs["point"]["prune.sparsity"] == 0.9  # best *feasible*: 0.98 breaks the criterion
    assert {t.user_attrs["point"]["prune.sparsity"]: t.constraints["drop_over_max"] > 0 for t in study.trials} == {
        0.5: False, 0.9: False, 0.98: True}
    assert (p.out / "pareto.png").stat().st_size > 1000 and (p.out / "importances.png").stat().st_size > 1000
    # Running it again without --resume is refused, and nothing is overwritten.
    before = (p.out / "results.csv").read_text()
    with pytest.raises(InputError, match=r"already exists(.|\n)*--resume"):
        run_fake(p)
    assert (p.out / "results.csv").read_text() == before


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_auto_finds_the_smallest_passing_config_without_rerunning_points(tmp_path, proj, sampler):
    f = write_sweep(tmp_path / "s.yaml", {
        "name": f"auto-{sampler}", "output": str(tmp_path / "out"), "space": {"prune.sparsity": SPARSITY},
        "search": {"mode": "auto", "sampler": sampler, "seed": 0, "initial": 3}, "criterion": {"max_drop": 0.02},
        "budget": {"trials": 6},
    })
    summary, calls = run_fake(plan(f, proj))
    points = [c["prune.sparsity"] for c in calls]
    assert len(points) == 6 and len(set(points)) == 6, points  # a point Optuna proposes twice is not run twice
    assert summary["chosen"]["point"]["prune.sparsity"] == 0.9, points


def test_auto_stops_when_every_point_was_tried(tmp_path, proj):
    f = write_sweep(tmp_path / "s.yaml", {"name": "small", "output": str(tmp_path / "out"), "space": {"prune.sparsity": [0.5, 0.9]},
                                         "search": {"mode": "auto"}, "budget": {"trials": 10}})
    summary, calls = run_fake(plan(f, proj))
    assert sorted(c["prune.sparsity"] for c in calls) == [0.5, 0.9] and summary["trials"] == 2


def test_random_search_is_seeded(tmp_path, proj):
    def run(seed, name):
        f = write_sweep(tmp_path / f"{name}.yaml", {
            "name": name, "output": str(tmp_path / name), "search": {"mode": "random", "trials": 4, "seed": seed},
            "space": {"prune.sparsity": Range(low=0.5, high=0.95).model_dump(), "distill.temperature": [2.0, 4.0]},
        })
        return [c for c in run_fake(plan(f, proj))[1]]

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert a == b and a != c and len(a) == 4
    assert all(0.5 <= x["prune.sparsity"] <= 0.95 and x["distill.temperature"] in (2.0, 4.0) for x in a)


def test_nsga2_front_is_the_studys_own(tmp_path, proj):
    import optuna

    f = write_sweep(tmp_path / "s.yaml", {"name": "mo", "output": str(tmp_path / "out"), "space": {"prune.sparsity": SPARSITY},
                                         "search": {"mode": "auto", "sampler": "nsga2", "initial": 4}, "budget": {"trials": 7}})
    p = plan(f, proj)
    summary, _ = run_fake(p)
    study = optuna.load_study(study_name="mo", storage=p.storage)
    assert study.metric_names == ["drop", "size_bytes", "latency_ms_b1"]
    # Optuna's Pareto set of the study (feasible trials) = ours over accuracy x size x latency, among passing trials.
    passing = {t.number for t in study.trials if t.constraints["drop_over_max"] <= 0}
    assert {t.number for t in study.best_trials} == set(summary["pareto"]) & passing
    assert summary["chosen"]["point"]["prune.sparsity"] == 0.9


def test_resume_reruns_only_the_interrupted_trial(tmp_path, proj):
    import optuna

    f = write_sweep(tmp_path / "s.yaml", {"name": "res", "output": str(tmp_path / "out"), "criterion": {"max_drop": 0.02},
                                         "space": {"prune.sparsity": [0.5, 0.8, 0.9, 0.98]}, "cluster": {"workers": 1}})
    p = plan(f, proj)
    first: list[dict] = []

    class Killed(BaseException):
        """The sweep's process dying mid-trial."""

    def dies_in_trial_2(spec):
        first.append(spec.point)
        if spec.index == 2:
            raise Killed
        return toy(spec)

    with pytest.raises(Killed):
        run_fake(p, evaluate=dies_in_trial_2)
    assert len(first) == 3  # two trials finished, the sweep died during the third
    study = optuna.load_study(study_name="res", storage=p.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    interrupted = study.trials[2].user_attrs["point"]
    summary, second = run_fake(p, resume=True)
    assert second[0] == interrupted  # the interrupted point first...
    assert sorted(c["prune.sparsity"] for c in first[:2] + second) == [0.5, 0.8, 0.9, 0.98]  # ...and no finished one again
    assert summary["done"] == 4 and summary["interrupted"] == 1 and summary["chosen"]["point"]["prune.sparsity"] == 0.9
    # A sweep still running holds its results folder: a second one (or a --resume) is refused at once.
    from flows.ops.sweep import preflight, sweep_lock

    with sweep_lock(p.out), pytest.raises(InputError, match=r"in use by a running sweep \(pid \d+\)"):
        preflight(p, resume=True)
    preflight(p, resume=True)  # released with its holder
    # Resuming with another search is refused, naming what changed.
    g = write_sweep(tmp_path / "s2.yaml", {"name": "res", "output": str(tmp_path / "out"), "criterion": {"max_drop": 0.02},
                                          "space": {"prune.sparsity": [0.5, 0.6]}, "cluster": {"workers": 1}})
    with pytest.raises(InputError, match=r"space changed"):
        run_fake(plan(g, proj), resume=True)


def test_results_keep_the_best_passing_trial_and_record_failures(tmp_path, proj):
    f = write_sweep(tmp_path / "s.yaml", {"name": "unit", "space": {"prune.sparsity": [0.5, 0.8, 0.9, 0.95]},
                                         "criterion": {"max_drop": 0.02}})
    p = plan(f, proj)
    results = [
        fake(0, {"prune.sparsity": 0.5}, acc=0.95, size=5000),
        fake(1, {"prune.sparsity": 0.8}, acc=0.94, size=2000),
        fake(2, {"prune.sparsity": 0.9}, acc=0.90, size=1000),  # misses the criterion
        fake(3, {"prune.sparsity": 0.95}, acc=0.0, size=0, status="failed"),
    ]
    summary = write_results(p, results, elapsed=12.0)
    assert summary["chosen"]["trial"] == 1 and summary["failed"] == 1 and summary["done"] == 3
    assert summary["pareto"] == [0, 1, 2]
    rows = list(csv.DictReader((p.out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert {"accuracy", "size_bytes", "latency_ms_b1", "compression_ratio", "drop", "passed", "pid"} <= set(rows[0])
    assert rows[3]["reason"] == "distill: boom"
    md = (p.out / "results.md").read_text()
    assert "Chosen: trial 1" in md and "trial 3: distill: boom" in md
    assert (p.out / "pareto.png").stat().st_size > 1000
    plots = json.loads((p.out / "pareto.json").read_text())
    assert [x["pareto"] for x in plots] == [True, True, True]
    # The chosen config is a ready-to-use params file.
    best = load_params(p.out / "best-params.yaml", root=proj)
    assert best.prune.sparsity == 0.8 and best.train_teacher.epochs == 8
    # Nothing passing: nothing chosen, and no stale best-params.yaml left behind.
    summary = write_results(p, [results[2], results[3]], elapsed=1.0, final=False)
    assert summary["chosen"] is None and not (p.out / "best-params.yaml").exists()


def test_failure_reason_picks_the_stage_error():
    out = (
        "Running stage 'distill':\n> shrinkflow stage distill\nerror: training diverged at epoch 1\n"
        "ERROR: failed to reproduce 'distill': failed to run: shrinkflow stage distill, exited with 1\n"
    )
    assert failure_reason(out) == "distill: training diverged at epoch 1"
    out = "Traceback (most recent call last):\n  File x\nModuleNotFoundError: No module named 'nope'\nERROR: failed to reproduce 'prune': x\n"
    assert failure_reason(out) == "prune: ModuleNotFoundError: No module named 'nope'"


# ------------------------------------------------------------------ workspaces and trials (no DVC run)


def test_workspace_copies_sources_and_shares_the_cache(tmp_path, proj):
    from configobj import ConfigObj

    from flows.ops.sweep import dvc_cache_dir
    from flows.ops.trials import make_workspace

    (proj / "sweeps" / "old").mkdir(parents=True, exist_ok=True)
    (proj / "sweeps" / "old" / "results.csv").write_text("x\n")
    (proj / "models").mkdir(exist_ok=True)
    (proj / "models" / "junk.bin").write_text("ignored by git")
    ws = make_workspace(proj, tmp_path / "ws", dvc_cache_dir(proj), exclude=["sweeps"])
    assert (ws / "dvc.yaml").read_text() == (proj / "dvc.yaml").read_text()
    assert (ws / "tasks" / "distill.py").is_file() and (ws / "params.yaml").is_file()
    assert not (ws / "sweeps").exists() and not (ws / "models").exists() and not (ws / ".git").exists()
    conf = ConfigObj(str(ws / ".dvc" / "config.local"))
    assert conf["cache"]["dir"] == str(proj / ".dvc" / "cache") and conf["core"]["no_scm"] == "true"
    private = make_workspace(proj, tmp_path / "ws2", None)
    assert "cache" not in ConfigObj(str(private / ".dvc" / "config.local"))


def test_trial_with_bad_params_or_no_time_left_fails_without_running(tmp_path, proj):
    import time

    from flows.ops.trials import run_trial
    from schemas.sweep import TrialSpec

    spec = dict(index=7, point={"prune.sparsity": 2.0}, project=str(proj), params_file=str(proj / "params.yaml"),
                cache_dir=None, workdir=str(tmp_path))
    res = run_trial(TrialSpec(overrides=["prune.sparsity=2.0"], **spec))
    assert res.status == "failed" and res.reason.startswith("params:") and "prune.sparsity" in res.reason
    res = run_trial(TrialSpec(overrides=[], deadline=time.time() - 1, **spec))
    assert res.status == "skipped" and res.reason.startswith("budget")
    assert list(tmp_path.iterdir()) == []  # workspaces are removed


def test_cli_sweep_rejects_a_bad_file_and_prints_the_schema(tmp_path, proj):
    from typer.testing import CliRunner

    from shrinkflow.cli import app

    bad = write_sweep(tmp_path / "s.yaml", {"space": {"prune.sparsity": [0.5, 1.5]}})
    res = CliRunner().invoke(app, ["sweep", str(bad), "--root", str(proj)])
    assert res.exit_code == 2 and "space.prune.sparsity" in res.output
    res = CliRunner().invoke(app, ["sweep", "--schema"])
    schema = json.loads(res.output)
    assert res.exit_code == 0 and {"space", "search", "criterion", "budget", "cluster"} <= set(schema["properties"])


def test_every_sweep_field_is_documented():
    from schemas.sweep import Sweep

    schema = Sweep.model_json_schema(by_alias=True)
    for node in [schema, *schema["$defs"].values()]:
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{node.get('title')}.{name} has no description"


def test_trial_past_its_timeout_is_stopped_and_recorded(tmp_path, proj):
    from flows.ops.trials import run_trial
    from schemas.sweep import TrialSpec

    spec = TrialSpec(index=1, point={}, overrides=[], project=str(proj), params_file=str(proj / "params.yaml"),
                     cache_dir=None, workdir=str(tmp_path), timeout=2.0)
    res = run_trial(spec)  # the whole chain needs far longer than 2 s: DVC and its stage get killed
    assert res.status == "failed" and res.reason.startswith("timeout"), res
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ real trials (DVC), scheduled in-process


@pytest.mark.slow
def test_pruner_stops_a_trial_that_cannot_meet_the_criterion(tmp_path, proj):
    """Two real trials on digits: 99.5 % sparsity is stopped after prune; 50 % runs to the end."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import optuna

    from flows.ops.trials import run_trial

    f = write_sweep(tmp_path / "s.yaml", {
        "name": "early", "output": str(tmp_path / "out"), "set": {"evaluate.batch_sizes": [1], "evaluate.min_run_time": 0.01},
        "space": {"prune.sparsity": [0.5, 0.995]}, "criterion": {"max_drop": 0.03}, "early_stop": {"margin": 0.05},
        "cluster": {"workers": 1}, "workdir": str(tmp_path),
    })
    p = plan(f, proj)
    with ThreadPoolExecutor(1) as pool:
        summary = Scheduler(
            p, lambda spec: pool.submit(run_trial, spec), lambda spec: pool.submit(run_trial, spec),
            first_done=lambda fs: next(iter(wait(fs, return_when=FIRST_COMPLETED).done)), log=lambda _: None,
        ).run()
    rows = {float(r["prune.sparsity"]): r for r in csv.DictReader((p.out / "results.csv").open())}
    hopeless, sound = rows[0.995], rows[0.5]
    assert hopeless["status"] == "pruned" and hopeless["reason"].startswith("early stop after prune: validation accuracy drop"), hopeless
    assert "prune" in hopeless["ran"].split() and not {"distill", "evaluate"} & set(hopeless["ran"].split())
    assert json.loads(hopeless["val_drops"])["prune"] > 0.08
    assert sound["status"] == "done" and sound["passed"] == "True"
    assert set(json.loads(sound["val_drops"])) == {"prune", "quantize", "distill"}
    assert all(v <= 0.08 for v in json.loads(sound["val_drops"]).values())
    # Optuna's own record: the trial is PRUNED at the prune stage's step, and the time saved is reported.
    study = optuna.load_study(study_name="early", storage=p.storage)
    t = next(t for t in study.trials if t.user_attrs["point"]["prune.sparsity"] == 0.995)
    assert t.state.name == "PRUNED" and list(t.intermediate_values) == [2]
    assert summary["pruned"] == 1 and summary["saved_seconds"] > 0 and float(hopeless["saved_seconds"]) > 0
    assert "Stopped early (1;" in (p.out / "results.md").read_text()
    assert summary["chosen"]["point"] == {"prune.sparsity": 0.5}
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith("shrinkflow-trial")] == []  # workspaces removed
