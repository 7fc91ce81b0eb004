"""ONNX export of a variant, with a parity and latency check in onnxruntime.

What exports:

* fp32 models (teacher, unstructured-pruned, distilled students) and structurally
  pruned models (their layers are simply smaller) export as they are.
* static / QAT int8 models (pt2e graphs) export as they are: a QDQ graph
  (QuantizeLinear / DequantizeLinear around every Conv/Linear, int8 weights),
  which onnxruntime runs with its int8 kernels.
* k-means weight-shared models export their float equivalent (``codebook[index]``
  materialised): the same function, the same outputs up to float rounding.
* dynamic-int8 models (``torch.ao`` ``quantize_dynamic``) have no int8 ONNX path
  in torch 2.13: the dynamo exporter fails in ``torch.export`` on the packed int8
  params, and the legacy TorchScript exporter has no ONNX symbolic for
  ``quantized::linear_dynamic``. We export the float model holding the dequantized
  int8 weights instead
  (``artifacts.to_float``) and say so in the result (``exported_as``); its outputs
  differ from the int8 model by the run-time activation quantization, which the
  parity check measures rather than hides. ``int8=True`` quantizes the exported
  graph with onnxruntime's dynamic int8 quantizer instead (its own scales).

Export uses the dynamo exporter with a dynamic batch dimension and
``external_data=False`` (one self-contained ``.onnx`` file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.artifacts import ModelHeader, float_index, to_float
from shrinkflow.errors import InputError
from shrinkflow.io import atomic_path
from shrinkflow.measure import latencies_ms
from shrinkflow.training import predict, quality


def exportable(model: nn.Module, header: ModelHeader) -> tuple[nn.Module, str]:
    """The module to export and how it relates to the variant ("as is" or why not)."""
    from shrinkflow.quantization.static import QuantizedGraph

    if isinstance(model, QuantizedGraph):
        return model.graph, "as is (int8 QDQ graph: pt2e static/qat)"
    i = float_index(header)
    if i == len(header.transforms):
        return model.eval(), "as is (fp32)"
    kinds = [t["kind"] for t in header.transforms[i:]]
    float_model = to_float(model, header).eval()
    if all(k == "kmeans" for k in kinds):
        return float_model, "float equivalent of the shared weights (codebook[index]); same function"
    return float_model, f"float model with the dequantized weights of {' + '.join(kinds)}: int8 ONNX is not supported for it"


def export_onnx(
    model: nn.Module, header: ModelHeader, path: str | os.PathLike[str], *, int8: bool = False
) -> dict[str, Any]:
    """Write ``model`` as one ONNX file with a dynamic batch dimension.

    Args:
        int8: quantize the exported graph with onnxruntime's own dynamic int8
            quantizer (``onnxruntime.quantization.quantize_dynamic``: int8 weights,
            activations quantized at run time, as ``quantize.method: dynamic`` does in
            torch). onnxruntime picks its own scales, so the integers are not those of
            a torch int8 variant: the parity check measures the difference.

    Returns:
        ``{"path", "size_bytes", "exported_as"}``.
    """
    float_model, how = exportable(model, header)
    if int8 and "int8 QDQ" in how:
        raise InputError("--int8: this model is int8 already (static/qat); its export is an int8 QDQ graph without it")
    example = torch.zeros(2, *header.input_shape)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in torch.export internals)
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            torch.onnx.export(
                float_model, (example,), str(onnx_tmp), dynamo=True, external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
        except Exception as exc:
            onnx_tmp.unlink(missing_ok=True)
            raise InputError(f"ONNX export failed for this model ({type(exc).__name__}: {exc})") from exc
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(onnx_tmp, tmp, weight_type=QuantType.QInt8)
            onnx_tmp.unlink()
            how += "; int8 by onnxruntime quantize_dynamic"
        else:
            os.replace(onnx_tmp, tmp)
    return {"path": str(path), "size_bytes": os.path.getsize(path), "exported_as": how}


def onnx_session(path: str | os.PathLike[str], threads: int = 1):
    """An onnxruntime CPU session with a fixed thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    batch_sizes: tuple[int, ...] = (1, 256),
    threads: int = 1,
    min_run_time: float = 1.0,
) -> dict[str, Any]:
    """Parity of an exported file with the PyTorch model on ``X``, and latency of both.

    Returns:
        ``max_abs_diff`` and ``argmax_agreement`` over all of ``X``; accuracy of each
        runtime when labels ``y`` are given; median ms per batch size for torch
        (eager) and onnxruntime, with ``threads`` threads in both, measured
        interleaved by ``measure.latencies_ms``.
    """
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    ort_out = torch.cat([run_onnx(X[i : i + 1024]) for i in range(0, len(X), 1024)])
    torch_out = predict(model, X)
    result: dict[str, Any] = {
        "max_abs_diff": float((ort_out - torch_out).abs().max()),
        "argmax_agreement": float((ort_out.argmax(1) == torch_out.argmax(1)).float().mean()),
        "threads": threads,
    }
    if y is not None:
        result["accuracy_torch"] = quality(torch_out, y, "classification")
        result["accuracy_onnx"] = quality(ort_out, y, "classification")
    lat = latencies_ms({"torch": model, "onnx": run_onnx}, X, list(batch_sizes), threads=threads, min_run_time=min_run_time)
    for b in batch_sizes:
        result[f"latency_ms_torch_b{b}"] = lat["torch"][b]
        result[f"latency_ms_onnx_b{b}"] = lat["onnx"][b]
    return result

