"""The one training loop every stage uses (teacher training, fine-tuning, distillation)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.params import Optimizer
from shrinkflow.data import Splits, Task
from shrinkflow.errors import TrainingDiverged
from shrinkflow.io import atomic_path

log = logging.getLogger("shrinkflow")

#: loss(outputs, *batch_targets) -> scalar
LossFn = Callable[..., torch.Tensor]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from shrinkflow.errors import ParamsError

        raise ParamsError("device: cuda, but no CUDA device is available: use device: auto or cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def task_loss(task: Task) -> LossFn:
    return F.cross_entropy if task == "classification" else F.mse_loss


def make_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs on CPU for all of ``X``."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = [model(X[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def _fingerprint(X: torch.Tensor) -> str:
    """SHA-256 of the inputs' dtype, shape and bytes: the cache's key."""
    X = X.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{X.dtype}{tuple(X.shape)}".encode())
    digest.update(X.numpy().tobytes())
    return digest.hexdigest()


def save_teacher_outputs(teacher: nn.Module, X: torch.Tensor, path: Path) -> torch.Tensor:
    """Compute the teacher's outputs on ``X`` and store them at ``path`` with the inputs' fingerprint."""
    outputs = predict(teacher, X)
    with atomic_path(path) as tmp:
        torch.save({"inputs_sha256": _fingerprint(X), "outputs": outputs}, tmp)
    return outputs


def teacher_outputs(teacher: nn.Module, X: torch.Tensor, cached: Path | None = None) -> torch.Tensor:
    """The teacher's outputs on ``X``: read from ``cached`` when it was made from these very inputs.

    Anything else (no file, other inputs, an unreadable file) falls back to computing
    them, with a log line saying why; the cache never changes what is trained.
    """
    if cached is not None and cached.exists():
        try:
            stored = torch.load(cached, map_location="cpu", weights_only=True)
            if stored["inputs_sha256"] == _fingerprint(X) and len(stored["outputs"]) == len(X):
                log.info("teacher outputs read from %s", cached.name)
                return stored["outputs"]
            log.info("teacher outputs in %s were made from other inputs: recomputing", cached.name)
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("teacher outputs in %s unreadable (%s): recomputing", cached.name, exc)
    return predict(teacher, X)


def quality(outputs: torch.Tensor, y: torch.Tensor, task: Task) -> float:
    """Accuracy (classification) or MSE (regression)."""
    if task == "classification":
        return float((outputs.argmax(1) == y).float().mean())
    return float(F.mse_loss(outputs, y))


def _show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass
class FitResult:
    epochs: int
    val_metric: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: nn.Module,
    data: Splits,
    *,
    epochs: int,
    batch_size: int,
    optimizer: Optimizer,
    seed: int,
    device: torch.device,
    where: str,
    loss_fn: LossFn | None = None,
    extra_targets: Sequence[torch.Tensor] = (),
    after_step: Callable[[nn.Module], None] | None = None,
    live_dir: Path | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data``'s train split.

    Args:
        loss_fn: ``loss(outputs, y, *extra)``; defaults to cross-entropy / MSE by task.
        extra_targets: tensors aligned with the train split passed to ``loss_fn``
            after the labels (e.g. the teacher's logits for distillation).
        after_step: called after every optimizer step (e.g. to keep pruned weights zero).
        where: the params section being run, named in errors (``train_teacher``).
        live_dir: where dvclive writes per-epoch curves; None = no curves.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    loss_fn = loss_fn or task_loss(data.task)
    X, y = data.tensors("train")
    Xv, yv = data.tensors("val")
    opt = make_optimizer(model, optimizer)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    result = FitResult(epochs=epochs, val_metric=None)
    live = _live(live_dir)
    n_batches = math.ceil(len(X) / batch_size)
    progress = None
    if _show_progress() and epochs:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        bar = progress.add_task(f"{where}", total=epochs * n_batches)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(X), generator=gen)
            total = 0.0
            for b in range(n_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                batch = [t[idx].to(device) for t in (X, y, *extra_targets)]
                loss = loss_fn(model(batch[0]), *batch[1:])
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"{where}: loss became {loss.item()} at epoch {epoch}, batch {b + 1}: training diverged. "
                        f"Lower {where}.optimizer.lr (now {optimizer.lr}) or check the data for NaN/inf values."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
                total += loss.item() * len(idx)
                if progress is not None:
                    progress.update(bar, advance=1, description=f"{where} epoch {epoch}/{epochs}")
            row = {"epoch": epoch, "train_loss": total / len(X)}
            if len(Xv):
                row["val_metric"] = quality(predict(model, Xv), yv, data.task)
                result.val_metric = row["val_metric"]
            result.history.append(row)
            log.info("%s epoch %d/%d %s", where, epoch, epochs, " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if live is not None:
                for k, v in row.items():
                    if k != "epoch":
                        live.log_metric(k, v)
                live.next_step()
    finally:
        if progress is not None:
            progress.stop()
        if live is not None:
            live.end()
    model.cpu().eval()
    if result.val_metric is None and len(Xv):
        result.val_metric = quality(predict(model, Xv), yv, data.task)
    return result


def _live(live_dir: Path | None):
    if live_dir is None:
        return None
    from dvclive import Live

    try:
        # dvcyaml=False: dvclive must not rewrite dvc.yaml from inside a stage.
        return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
    except Exception as exc:  # dvclive refuses e.g. a git repo without commits
        log.warning("per-epoch curves disabled (%s): dvclive needs a git repo with at least one commit", exc)
        return None
