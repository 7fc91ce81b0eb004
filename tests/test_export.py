"""ONNX export: parity with PyTorch in onnxruntime, for fp32, structurally pruned and quantized variants."""

from __future__ import annotations

import pytest
import torch

from shrinkflow.artifacts import ModelHeader
from shrinkflow.export import check_onnx, export_onnx
from tests.toy_models import prune_structurally

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _header(spec) -> ModelHeader:
    return ModelHeader(spec=spec, input_shape=[1, 8, 8], out_features=10, task="classification")


@pytest.fixture(scope="module")
def X() -> torch.Tensor:
    return torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_fp32_lenet_parity(tmp_path, X):
    h = _header({"arch": "lenet5"})
    torch.manual_seed(0)
    model = h.build().eval()
    info = export_onnx(model, h, tmp_path / "m.onnx")
    assert info["size_bytes"] > 0 and not (tmp_path / "m.onnx.data").exists()
    res = check_onnx(info["path"], model, X, batch_sizes=(1, 7), min_run_time=0.05)
    assert res["max_abs_diff"] < 1e-4
    assert res["argmax_agreement"] == 1.0
    assert res["latency_ms_onnx_b7"] > 0 and res["latency_ms_torch_b7"] > 0


def test_structured_pruned_parity(tmp_path, X):
    h = _header({"arch": "mlp", "hidden": [40, 20]})
    torch.manual_seed(0)
    model = h.build().eval()
    hs = prune_structurally(model, h)
    info = export_onnx(model, hs, tmp_path / "s.onnx")
    assert info["exported_as"].startswith("as is")
    res = check_onnx(info["path"], model, X, batch_sizes=(3,), min_run_time=0.05)
    assert res["max_abs_diff"] < 1e-4 and res["argmax_agreement"] == 1.0


def test_dynamic_int8_exports_its_float_equivalent_and_says_so(tmp_path, X):
    from schemas.quantize import DynamicQuant
    from shrinkflow.methods import Env
    from shrinkflow.quantization import QUANTIZERS

    h = _header({"arch": "mlp", "hidden": [40]})
    torch.manual_seed(0)
    q, hq = QUANTIZERS["dynamic"](h.build().eval(), h, DynamicQuant(), Env())
    info = export_onnx(q, hq, tmp_path / "q.onnx")
    assert "int8 ONNX is not supported" in info["exported_as"]
    res = check_onnx(info["path"], q, X, batch_sizes=(3,), min_run_time=0.05)
    # Same weights, but fp32 activations in ONNX vs int8 activations in torch: close, not equal.
    assert res["max_abs_diff"] < 0.05
    # onnxruntime's own int8 quantization of the same graph: runs, and agrees closely.
    info8 = export_onnx(q, hq, tmp_path / "q8.onnx", int8=True)
    assert "int8 by onnxruntime" in info8["exported_as"]
    res8 = check_onnx(info8["path"], q, X, batch_sizes=(3,), min_run_time=0.05)
    assert res8["argmax_agreement"] > 0.9
