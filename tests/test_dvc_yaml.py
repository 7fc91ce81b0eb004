"""dvc.yaml spells the paths of schemas/paths.py; one name per stage everywhere."""

from __future__ import annotations

import yaml
from conftest import REPO

from schemas.params import Params
from schemas.paths import STAGES, VARIANTS, StagePaths


def _entries(items) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def test_stages_commands_params_and_outputs_match_the_code():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = StagePaths(REPO)
    assert list(stages) == list(STAGES)
    produced: list[str] = []  # outputs of the stages before this one: absent in a fresh clone
    for name, st in stages.items():
        assert st["cmd"] == f"shrinkflow stage {name}"
        assert name in st["params"] and name in Params.model_fields  # the stage's own params section
        assert paths.rel(paths.manifest(name)) in _entries(st.get("metrics"))
        assert f"tasks/{name}.py" in st["deps"]
        for dep in st["deps"]:
            assert dep.startswith("${") or dep in produced or (REPO / dep).exists(), (
                f"{name}: dep {dep} is neither in the repo nor an output of an earlier stage"
            )
        produced += _entries(st.get("outs")) + _entries(st.get("metrics"))
    for stage in VARIANTS:
        assert paths.rel(paths.model_dir(stage)) in _entries(stages[stage]["outs"])
    assert paths.rel(paths.splits.parent) in _entries(stages["data"]["outs"])
    evaluate = stages["evaluate"]
    assert paths.rel(paths.metrics) in _entries(evaluate["metrics"])
    assert paths.rel(paths.report) in _entries(evaluate["outs"])
    for stage in VARIANTS:
        assert paths.rel(paths.model_dir(stage)) in evaluate["deps"]
