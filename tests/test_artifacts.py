"""Model files: round trips, safe loading, clear errors for bad files."""

from __future__ import annotations

import pickle

import pytest
import torch

from schemas.quantize import DynamicQuant
from shrinkflow.artifacts import ModelHeader, keep_constraints, save_model, to_float
from shrinkflow.errors import InputError
from shrinkflow.loading import load, load_model
from shrinkflow.methods import Env
from shrinkflow.quantization import QUANTIZERS


def header(**kw) -> ModelHeader:
    base = dict(spec={"arch": "mlp", "hidden": [16]}, input_shape=[1, 8, 8], out_features=10, task="classification")
    return ModelHeader(**(base | kw))


def test_dense_round_trip_is_exact(tmp_path):
    h = header()
    model = h.build()
    size = save_model(model, tmp_path / "m.pt", h)
    assert size == (tmp_path / "m.pt").stat().st_size
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(load(tmp_path / "m.pt")(x), model.eval()(x))


def test_dynamic_int8_round_trip_and_float_view(tmp_path):
    h = header(spec={"arch": "mlp", "hidden": [64]})
    model = h.build().eval()
    with torch.no_grad():
        model.net[1].weight[:, :32] = 0  # pruned zeros must survive quantization
    qmodel, qh = QUANTIZERS["dynamic"](model, h, DynamicQuant(), Env())
    assert [t["kind"] for t in qh.transforms] == ["dynamic"]  # named after the method
    qh = qh.model_copy(update={"masked": True})
    save_model(qmodel, tmp_path / "q.pt", qh)
    loaded, lh = load_model(tmp_path / "q.pt")
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(loaded(x), qmodel(x))
    assert (tmp_path / "q.pt").stat().st_size < 0.5 * save_model(model, tmp_path / "f.pt", h)
    flt = to_float(loaded, lh)
    assert isinstance(flt.net[1], torch.nn.Linear)
    assert (flt.net[1].weight[:, :32] == 0).all()
    # float view computes what the quantized weights compute (activations stay float)
    assert torch.allclose(flt(x), model(x), atol=0.1)
    hook = keep_constraints(flt, lh)
    with torch.no_grad():
        flt.net[1].weight.add_(1.0)
    hook(flt)
    assert (flt.net[1].weight[:, :32] == 0).all()


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_never_runs_code_from_the_file(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"shrinkflow": 1, "header": {}, "state": Evil()}, f, protocol=2)
    with pytest.raises(InputError, match="Python objects that loading would have to run") as err:
        load(path)
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe way
    assert "code ran" not in capsys.readouterr().out


def test_bad_files_fail_clearly(tmp_path):
    h = header()
    save_model(h.build(), tmp_path / "m.pt", h)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged or truncated"):
        load(tmp_path / "trunc.pt")
    with pytest.raises(InputError, match="not found"):
        load(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(InputError, match="not a shrinkflow model file"):
        load(tmp_path / "plain.pt")
    torch.save({"shrinkflow": 99, "header": {}, "state": {}}, tmp_path / "future.pt")
    with pytest.raises(InputError, match="newer shrinkflow"):
        load(tmp_path / "future.pt")


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    h = header()
    save_model(h.build(), tmp_path / "m.pt", h)
    before = (tmp_path / "m.pt").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_model(h.build(), tmp_path / "m.pt", h)
    assert (tmp_path / "m.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
