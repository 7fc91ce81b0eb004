"""The recipe mechanics params express (issue: one path for every published number), on digits:
learning-rate schedules change the rate as declared, iterative steps reach their per-step
targets, per-layer bit widths land in the packed file, soft targets reach every fine-tuning."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import FAST, REPO

from schemas.common import Optimizer
from schemas.data import DigitsData
from schemas.paths import StagePaths
from schemas.prune import MagnitudePrune
from shrinkflow.artifacts import ModelHeader
from shrinkflow.config import load_params
from shrinkflow.data import prepare
from shrinkflow.loading import load_model
from shrinkflow.masks import sparsity
from shrinkflow.pruning.schedule import unstructured_schedule
from shrinkflow.quantization import codebooks
from shrinkflow.training import fit
from tasks.run import run_stage


@pytest.fixture(scope="module")
def digits():
    return prepare(DigitsData(), seed=0)


def _mlp(digits):
    torch.manual_seed(0)
    h = ModelHeader(spec={"arch": "mlp", "hidden": [32]}, input_shape=digits.input_shape, out_features=10, task="classification")
    return h.build()


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"name": "constant"}, [0.1] * 6),
        ({"name": "step", "step_size": 2, "gamma": 0.5}, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]),
        ({"name": "multistep", "milestones": [1, 4], "gamma": 0.1}, [0.1, 0.01, 0.01, 0.01, 0.001, 0.001]),
        ({"name": "cosine", "min_lr": 0.0}, [0.1 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(6)]),
    ],
    ids=["constant", "step", "multistep", "cosine"],
)
def test_lr_schedules_change_the_rate_as_declared(digits, schedule, expected):
    opt = Optimizer.model_validate({"lr": 0.1, "lr_schedule": schedule})
    seen = []
    fit(_mlp(digits), digits, epochs=6, batch_size=256, optimizer=opt, seed=0, device=torch.device("cpu"), where="t",
        on_epoch=lambda row: seen.append(row["lr"]))
    assert seen == pytest.approx(expected, rel=1e-6)


def test_iterative_steps_reach_each_per_step_target(digits):
    model = _mlp(digits)
    params = MagnitudePrune.model_validate({
        "scope": "layer", "layers": {"net.1": 0.9, "net.3": 0.5}, "schedule": "iterative",
        "steps": [0.25, 0.5, 1.0], "step_epochs": [1, 0, 3],
    })
    calls = []

    def finetune(m, epochs, after_step):
        calls.append((epochs, sparsity(m)[1]))
        after_step(m)

    unstructured_schedule(model, params, finetune, steps_per_epoch=1)
    # Step 2 has 0 fine-tuning epochs: no call. Each call sees its step's share of each layer's target.
    assert [e for e, _ in calls] == [1, 3]
    for (_, per_layer), share in zip(calls, (0.25, 1.0), strict=True):
        assert per_layer["net.1.weight"] == pytest.approx(0.9 * share, abs=0.005)
        assert per_layer["net.3.weight"] == pytest.approx(0.5 * share, abs=0.005)


def test_params_refuse_steps_that_do_not_make_a_schedule():
    from shrinkflow.errors import ParamsError

    base = ["prune.schedule=iterative"]
    for bad, key in (("prune.steps=[0.5, 0.4, 1.0]", "increase"), ("prune.steps=[0.5, 0.9]", "last of steps must be 1.0"),
                     ("prune.step_epochs=[1, 2]", "needs 3 epoch counts")):
        with pytest.raises(ParamsError, match=key):
            load_params(REPO / "params.yaml", [*base, bad], root=REPO)
    with pytest.raises(ParamsError, match="belong to schedule: iterative"):
        load_params(REPO / "params.yaml", ["prune.steps=[0.5, 1.0]"], root=REPO)


def test_a_deep_compression_recipe_on_digits_lands_in_the_file(tmp_path, caplog):
    """The Deep Compression preset's mechanics, small: per-layer densities reached, the decayed rate in
    the curves, the teacher's soft targets in both fine-tunings, per-layer bits in the packed file."""
    over = [
        *FAST, "train_teacher.model={arch: mlp, hidden: [64, 32]}",
        "prune={method: magnitude, scope: layer, layers: {net.1: 0.9, net.3: 0.8, net.5: 0.5}, schedule: iterative, "
        "steps: [0.5, 1.0], step_epochs: [1, 3], dead_units: false, finetune: {distill_from_teacher: true, optimizer: {lr: 0.01, "
        "lr_schedule: {name: multistep, milestones: [1, 2], gamma: 0.5}}}}",
        "quantize={method: kmeans, layer_bits: {net.1: 5, net.3: 4, net.5: 3}, finetune: {epochs: 1, distill_from_teacher: true}}",
        "distill.enabled=false", "evaluate.pack=student",
    ]
    params = load_params(REPO / "params.yaml", over, root=tmp_path)
    out = {}
    for s in ("data", "train_teacher", "prune", "quantize", "distill", "evaluate"):
        with caplog.at_level("INFO", logger="shrinkflow"):
            caplog.clear()
            out[s] = run_stage(s, params, tmp_path)
            if s in ("prune", "quantize"):  # both fine-tunings read the teacher's stored soft targets
                assert "teacher outputs read from outputs.pt" in caplog.text, s
    # dead_units: false above keeps every layer's shape, so each density is the preset's own.
    targets = {"net.1.weight": 0.9, "net.3.weight": 0.8, "net.5.weight": 0.5}
    for k, t in targets.items():
        assert out["prune"].layer_sparsity[k] == pytest.approx(t, abs=0.005), k
    paths = StagePaths(tmp_path)
    with open(paths.live("prune") / "plots" / "metrics" / "lr.tsv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f, delimiter="\t")]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.0025])  # step 1's run, then step 2's decayed run
    packed, _ = load_model(paths.packed("student"))
    bits = {"net.1": 5, "net.3": 4, "net.5": 3}
    for name, (book, idx) in codebooks(packed).items():
        weight = book[idx.long()]
        assert len(torch.unique(weight)) <= 2 ** bits[name], name
        assert float((weight == 0).float().mean()) == pytest.approx(targets[f"{name}.weight"], abs=0.005)  # zeros kept
    assert set(codebooks(packed)) == set(bits)
