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


def make_scheduler(opt: torch.optim.Optimizer, cfg: Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's scheduler for ``cfg.lr_schedule``, stepped once per epoch of a run of ``epochs``; None when constant."""
    s = cfg.lr_schedule
    sched = torch.optim.lr_scheduler
    if s.name == "step":
        return sched.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    if s.name == "multistep":
        return sched.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=max(1, epochs - 1), eta_min=s.min_lr)
    return None


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
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data``'s train split.

    Args:
        loss_fn: ``loss(outputs, y, *extra)``; defaults to cross-entropy / MSE by task.
        extra_targets: tensors aligned with the train split passed to ``loss_fn``
            after the labels (e.g. the teacher's logits for distillation).
        after_step: called after every optimizer step (e.g. to keep pruned weights zero).
        where: the params section being run, named in errors (``train_teacher``).
        on_epoch: receives each epoch's row (``train_loss``, ``lr``, ``val_metric``), e.g. to
            write per-epoch curves.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    loss_fn = loss_fn or task_loss(data.task)
    X, y = data.tensors("train")
    Xv, yv = data.tensors("val")
    opt = make_optimizer(model, optimizer)
    scheduler = make_scheduler(opt, optimizer, epochs)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    result = FitResult(epochs=epochs, val_metric=None)
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
            row = {"epoch": epoch, "train_loss": total / len(X), "lr": opt.param_groups[0]["lr"]}
            if scheduler is not None:
                scheduler.step()
            if len(Xv):
                row["val_metric"] = quality(predict(model, Xv), yv, data.task)
                result.val_metric = row["val_metric"]
            result.history.append(row)
            log.info("%s epoch %d/%d %s", where, epoch, epochs, " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if on_epoch is not None:
                on_epoch({k: v for k, v in row.items() if k != "epoch"})
    finally:
        if progress is not None:
            progress.stop()
    model.cpu().eval()
    if result.val_metric is None and len(Xv):
        result.val_metric = quality(predict(model, Xv), yv, data.task)
    return result

