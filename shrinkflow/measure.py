"""Measurements of a variant: parameters, size on disk, CPU latency.

Latency follows BENCH-PROTOCOL: fixed thread count, warm-up, variants interleaved,
median of repeated ``torch.utils.benchmark`` measurements.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from schemas.outputs import ModelFile
from shrinkflow.artifacts import ModelHeader, to_float
from shrinkflow.models import count_params, forward_with_hooks


def model_file(path: Path, model: nn.Module, header: ModelHeader, root: Path) -> ModelFile:
    """Describe a saved variant: its file size and parameter counts.

    Quantized modules hide their weights from ``parameters()``, so counts come from
    the float model with the same (dequantized) weights.
    """
    total, nonzero = count_params(to_float(model, header))
    return ModelFile(
        path=Path(path).resolve().relative_to(Path(root).resolve()).as_posix(),
        size_bytes=os.path.getsize(path),
        params=total,
        nonzero_params=nonzero,
        format=" + ".join([t["kind"] for t in header.transforms] or ["fp32"]) + f" / {header.storage}",
    )


def macs(model: nn.Module, header: ModelHeader) -> int | None:
    """Multiply-accumulates per example, counted by Torch-Pruning on the float equivalent.

    Zeroed weights still count (dense kernels compute them); structured pruning
    lowers it. Recurrent layers are counted here (``recurrent_macs``). None when
    the model has layers the counter cannot trace.
    """
    import torch_pruning as tp

    float_model = to_float(model, header).eval()
    example = torch.zeros(1, *header.input_shape)
    try:
        counted, _, per_layer, _ = tp.utils.count_ops_and_params(float_model, example, layer_wise=True)
        ours = recurrent_macs(float_model, example)
    except Exception:  # a user module the op counter cannot run: report no figure rather than fail
        return None
    return int(counted - sum(per_layer.get(m) or 0 for m in ours) + sum(ours.values()))


def recurrent_macs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """MACs of each LSTM/GRU/RNN layer for one example: steps × the gate matrices of every layer and direction.

    Torch-Pruning 1.6 reads a batch-first sequence's length as its batch size, so its
    figure for these layers is steps times too large.
    """
    from shrinkflow.masks import RECURRENT

    steps: dict[nn.Module, int] = {}

    def hook(mod: nn.Module, inputs: tuple, _out: Any) -> None:
        x = inputs[0]
        steps[mod] = int(x.shape[1] if mod.batch_first and x.dim() == 3 else x.shape[0])

    forward_with_hooks(model, example, [m for m in model.modules() if isinstance(m, RECURRENT)], hook)
    out = {}
    for m, t in steps.items():
        per_step = sum(getattr(m, n).numel() for n in m._flat_weights_names if n.startswith("weight_"))
        out[m] = t * per_step
    return out


def sparsity_of(model: nn.Module, header: ModelHeader) -> tuple[float, dict[str, float]]:
    """Share of zeros among prunable weights (global, per layer), quantized variants included."""
    from shrinkflow.masks import sparsity

    return sparsity(to_float(model, header))


def batch_of(X: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` real inputs, repeated if the split is smaller."""
    reps = -(-n // len(X))
    return X.repeat(reps, *([1] * (X.dim() - 1)))[:n].contiguous()


def latencies_ms(
    models: Mapping[str, Callable[[torch.Tensor], Any]], X: torch.Tensor, batch_sizes: list[int], *, threads: int, min_run_time: float, rounds: int = 3
) -> dict[str, dict[int, float]]:
    """Median latency in ms of each model (any callable on a batch) at each batch size, variants interleaved."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in models}
        inputs = {b: batch_of(X, b) for b in batch_sizes}
        with torch.inference_mode():
            for m in models.values():  # warm-up
                for b in batch_sizes:
                    m(inputs[b])
            for _ in range(rounds):
                for b in batch_sizes:
                    for name, m in models.items():
                        t = benchmark.Timer(stmt="m(x)", globals={"m": m, "x": inputs[b]}, num_threads=threads)
                        samples[name][b].append(t.blocked_autorange(min_run_time=min_run_time / rounds).median * 1e3)
        return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in samples.items()}
    finally:
        torch.set_num_threads(previous)


RUNTIMES = {"eager": "eager PyTorch", "compile": "torch.compile (inductor, frozen weights)"}


def runtime_for(models: Mapping[str, nn.Module], runtime: str) -> str:
    """The runtime ``auto`` stands for: ``compile`` when a model is a pt2e int8 graph (its deployable
    form is compiled; eagerly it runs reference kernels), else ``eager``."""
    if runtime != "auto":
        return runtime
    from shrinkflow.quantization.static import QuantizedGraph

    return "compile" if any(isinstance(m, QuantizedGraph) for m in models.values()) else "eager"


def compiled(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``model`` compiled as it is deployed: ``torch.compile`` (inductor) with frozen weights and static
    shapes (the quantized convolutions fail to compile with dynamic ones), so each input shape
    compiles on its first call.

    Freezing is switched on around compilation only (each new shape's first call):
    ``torch.compile(options={"freezing": True})`` does not reach the pass that prepacks
    oneDNN int8 weights (it fails on ``onednn.qconv_prepack``), the config patch does.
    """
    import torch._inductor.config as inductor

    fn = torch.compile(model.eval(), dynamic=False)
    seen: set[tuple[int, ...]] = set()

    def run(x: torch.Tensor) -> Any:
        shape = tuple(x.shape)
        if shape in seen:
            return fn(x)
        with inductor.patch(freezing=True):
            out = fn(x)
        seen.add(shape)
        return out

    return run


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows; stated beside every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
