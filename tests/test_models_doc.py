"""docs/models.md stays true: every cell's works / refuses, checked on tiny instances of each family.

The figures in the document come from ``bench/models_matrix.py`` (each family's preset);
what this test keeps true is the status of every cell: a refusal listed there is the
exact message the method gives on that family, and a cell that works is one no method
refuses.
"""

from __future__ import annotations

import re

import pytest
import torch

from schemas.prune import MagnitudePrune, RandomPrune, StructuredPrune, VariationalPrune
from schemas.quantize import DynamicQuant, KMeansQuant, QATQuant, StaticQuant
from shrinkflow.artifacts import ModelHeader
from shrinkflow.compat import prune_refusal, quantize_refusal
from tests.conftest import REPO

DOC = REPO / "docs" / "models.md"
TINY = {
    "mobilenet": {"arch": "mobilenet", "widths": [4, 8], "blocks": 1},
    "lstm": {"arch": "lstm", "hidden": 8},
    "gru": {"arch": "gru", "hidden": 8},
    "transformer": {"arch": "transformer", "dim": 8, "heads": 2, "mlp": 16},
}
PRUNE = {"magnitude": MagnitudePrune(), "random": RandomPrune(method="random"), "structured": StructuredPrune(method="structured"),
         "variational": VariationalPrune(method="variational")}
QUANTIZE = {"dynamic": DynamicQuant(), "static": StaticQuant(), "qat": QATQuant(), "kmeans": KMeansQuant()}


def parse() -> tuple[list[str], dict[str, dict[str, str]], dict[tuple[str, str], str]]:
    """(column keys, {family: {column: cell}}, {(family, column): refusal message})."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| family |"))
    cols = re.findall(r"`([\w-]+)`", lines[head])
    table = {}
    for ln in lines[head + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0]] = dict(zip(cols, cells[2:], strict=True))
    refusals = {(m.group(1), m.group(2)): m.group(3) for m in re.finditer(r"\*\*(\w+) × ([\w-]+)\*\*: `(.+)`", DOC.read_text())}
    return cols, table, refusals


def refusal(family: str, column: str) -> str | None:
    header = ModelHeader(spec=TINY[family], input_shape=[1, 8, 8], out_features=10, task="classification")
    torch.manual_seed(0)
    model = header.build().eval()
    if column in PRUNE:
        return prune_refusal(model, header, PRUNE[column])
    if column in QUANTIZE:
        return quantize_refusal(model, header, QUANTIZE[column])
    return None  # distillation and ONNX export refuse no family


def test_the_matrix_covers_every_family_and_method():
    cols, table, refusals = parse()
    assert set(table) == set(TINY)
    assert {*PRUNE, *QUANTIZE, "distill-new", "distill-compressed", "onnx"} == set(cols)
    for family, row in table.items():
        for col, cell in row.items():
            assert cell.startswith(("works", "refused")), (family, col, cell)
            assert cell.startswith("refused") == ((family, col) in refusals), (family, col)


@pytest.mark.parametrize("family", list(TINY))
def test_every_cell_says_what_the_methods_do(family):
    cols, table, refusals = parse()
    for col in cols:
        got = refusal(family, col)
        if table[family][col].startswith("refused"):
            assert got == refusals[(family, col)], (family, col)
        else:
            assert got is None, (family, col, got)
