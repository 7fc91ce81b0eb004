"""params.yaml validation: defaults, overrides, and a corpus of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from pydantic import ValidationError
from typer.testing import CliRunner

from schemas.params import MagnitudePrune, Params
from shrinkflow.cli import app
from shrinkflow.config import apply_to_params_file, load_params, parse_override
from shrinkflow.errors import ParamsError

BAD = sorted((Path(__file__).parent / "bad_params").glob("*.yaml"))
runner = CliRunner()


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[:1]
    return first[0].removeprefix("# expect: ") if first else "is empty"


def test_shipped_params_files_are_valid(tmp_path):
    mnist = fake_mnist(tmp_path / "mnist")
    for f in [REPO / "params.yaml", *sorted((REPO / "examples").glob("*/params.yaml"))]:
        source = (yaml.safe_load(f.read_text()).get("data") or {}).get("source")
        load_params(f, [f"data.path={mnist}"] if source == "mnist" else [], root=REPO)


def fake_mnist(folder):
    """The four IDX files, a few blank images each: enough for what validation reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3), ("t10k", 2)):
        _idx(folder / f"{split}-images-idx3-ubyte.gz", (n, 28, 28))
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", (n,))
    return folder


def _idx(path, shape):
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + bytes(int(np.prod(shape))))


def test_mnist_example_valid_with_data_path(tmp_path):
    folder = fake_mnist(tmp_path / "mnist")
    p = load_params(REPO / "examples/mnist-lenet300/params.yaml", [f"data.path={folder}"], root=REPO)
    assert p.data.source == "mnist" and p.train_teacher.model.hidden == [300, 100]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not an idx file")
    with pytest.raises(ParamsError, match="t10k-labels-idx1-ubyte.gz: not a readable IDX file"):
        load_params(REPO / "examples/mnist-lenet300/params.yaml", [f"data.path={folder}"], root=REPO)


@pytest.mark.parametrize("bad", BAD, ids=[p.stem for p in BAD])
def test_bad_params_exit_2_naming_the_key(bad, tmp_path):
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2, result.output
    assert expected(bad) in result.output


def test_override_parsing_and_validation():
    keys, value = parse_override("prune.sparsity=0.9")
    assert keys == ["prune", "sparsity"] and value == 0.9
    assert parse_override("evaluate.batch_sizes=[1, 8]")[1] == [1, 8]
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_override("prune.sparsity")
    with pytest.raises(ParamsError, match="prune.sparsity"):
        load_params(REPO / "params.yaml", ["prune.sparsity=2"], root=REPO)


def test_defaults_and_method_registry():
    p = Params()
    assert isinstance(p.prune, MagnitudePrune) and p.prune.scope == "global"
    with pytest.raises(ValidationError):
        p.prune.sparsity = 0.1  # frozen


def test_apply_keeps_file_on_error_and_comments_on_success(tmp_path):
    target = tmp_path / "params.yaml"
    original = "# my comment\nprune:\n  sparsity: 0.5 # keep me\n"
    target.write_text(original)
    with pytest.raises(ParamsError):
        apply_to_params_file(target, overrides=["prune.sparsity=7"])
    assert target.read_text() == original
    apply_to_params_file(target, overrides=["prune.sparsity=0.9", "seed=3"])
    text = target.read_text()
    assert "# my comment" in text and "# keep me" in text
    assert load_params(target, root=tmp_path).prune.sparsity == 0.9


def test_schema_command_documents_every_field():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            if "$ref" not in prop and "discriminator" not in prop and "anyOf" not in prop and "oneOf" not in prop:
                assert prop.get("description"), f"{path}.{name} has no description"

    walk(schema, "")
    for name, d in schema["$defs"].items():
        walk(d, name)


def test_params_reference_is_current():
    from shrinkflow.paramdoc import params_reference

    assert (REPO / "docs/params.md").read_text() == params_reference(), "regenerate: shrinkflow params-doc > docs/params.md"
