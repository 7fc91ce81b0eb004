"""Shared helpers of the pruning benchmarks (bench/prune_*.py): data, teacher, pruning, host facts."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from schemas.common import Optimizer  # noqa: E402
from schemas.data import MnistData  # noqa: E402
from shrinkflow.artifacts import ModelHeader, load_model, save_model  # noqa: E402
from shrinkflow.data import Splits, prepare  # noqa: E402
from shrinkflow.distillation import logits_loss  # noqa: E402
from shrinkflow.measure import cpu_model  # noqa: E402
from shrinkflow.pruning.schedule import run_schedule  # noqa: E402
from shrinkflow.training import fit, predict, seed_everything  # noqa: E402


def host() -> dict[str, Any]:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def mnist(folder: Path, seed: int, train_limit: int | None = None) -> Splits:
    """Full MNIST: 54,000 train / 6,000 validation (seeded, stratified) / the official 10,000 test."""
    return prepare(MnistData(source="mnist", path=str(folder.resolve()), val_fraction=0.1, train_limit=train_limit), seed, root=Path("/"))


def accuracy_pct(model: torch.nn.Module, splits: Splits, split: str = "test") -> float:
    X, y = splits.tensors(split)
    return 100.0 * float((predict(model, X).argmax(1) == y).float().mean())


def train_teacher(spec: dict, splits: Splits, epochs: int, lr: float, seed: int, path: Path) -> float:
    """Train and save an fp32 teacher (dense file: the baseline); return seconds taken."""
    seed_everything(seed)
    header = ModelHeader(spec=spec, input_shape=splits.input_shape, out_features=splits.out_features, task=splits.task)
    model = header.build()
    t0 = time.time()
    fit(model, splits, epochs=epochs, batch_size=128, optimizer=Optimizer(name="sgd", lr=lr, momentum=0.9),
        seed=seed, device=torch.device("cpu"), where="teacher")
    save_model(model, path, header)
    return time.time() - t0


def prune_file(teacher_path: Path, params: Any, splits: Splits, seed: int, out: Path) -> float:
    """Prune a saved teacher with the stage's own schedule code and save it as the stage does.

    Returns seconds taken. Fine-tuning uses ``params.finetune`` (with the teacher's
    soft targets when ``distill_from_teacher``).
    """
    seed_everything(seed)
    model, header = load_model(teacher_path)
    ft = params.finetune
    kw: dict[str, Any] = {}
    if ft.distill_from_teacher:
        teacher, _ = load_model(teacher_path)
        kw = {"loss_fn": logits_loss(ft.temperature, ft.alpha), "extra_targets": [predict(teacher, splits.tensors("train")[0])]}

    def finetune(m, epochs, after_step):
        return fit(m, splits, epochs=epochs, batch_size=ft.batch_size, optimizer=ft.optimizer, seed=seed,
                   device=torch.device("cpu"), where="prune.finetune", after_step=after_step, **kw)

    t0 = time.time()
    steps = math.ceil(len(splits.tensors("train")[0]) / ft.batch_size)
    result = run_schedule(model, params, header.input_shape, finetune, steps)
    for entry in result.transforms:
        header = header.with_transform(**entry)
    header = header.model_copy(update={"masked": bool(result.masks), "storage": "sparse"})
    save_model(result.model, out, header)
    return time.time() - t0
