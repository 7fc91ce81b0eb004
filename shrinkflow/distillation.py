"""Knowledge distillation: one training plan per ``distill.method``, driven by ``fit``.

The teacher's outputs on the transfer set (the training split) are computed once,
by the train_teacher stage, and stored beside the teacher as a DVC output
(``StagePaths.teacher_outputs``); the distill and prune stages read them back with
``training.teacher_outputs`` and pass them in (``Env.teacher_outputs``). They reach
``fit`` as extra targets aligned with the split, so each epoch costs only the
student's forward and backward passes.

Methods (``PLANS``), all run by one entry point, :func:`distill` ``(student, header,
params, env) -> (student, header)``; the student is a compressed variant, trained with
its zeros and quantization kept and quantized again after, or a new model:

- ``logits`` (Hinton et al. 2015): ``alpha·T²·KL(p_T^teacher ‖ p_T^student) +
  (1-alpha)·CE(student, y)``.
- ``regression``: ``alpha·MSE(student, teacher) + (1-alpha)·MSE(student, y)``.
- ``hint`` (Romero et al. 2015, FitNets): the output loss above plus ``weight·MSE``
  between a learned projection of a student layer and a teacher layer. The
  projection is trained with the student and discarded afterwards.

A method's plan is ``(student, teacher, X_train, teacher_out, task, params) -> Plan``;
adding one is adding a variant to ``schemas.distill`` and an entry here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from schemas.distill import DistillParams
from shrinkflow.artifacts import ModelHeader, from_float, keep_constraints, to_float
from shrinkflow.data import Task
from shrinkflow.errors import ParamsError
from shrinkflow.losses import KDLoss, logits_loss, regression_loss
from shrinkflow.methods import Env
from shrinkflow.training import FitResult, fit, predict

log = logging.getLogger("shrinkflow")

#: Teacher hints larger than this (all of the transfer set, float32) are recomputed per
#: batch instead of stored: a conv layer of LeNet-5 on MNIST would need gigabytes.
MAX_STORED_HINT_BYTES = 512 * 2**20


def output_loss(method: str, params: DistillParams) -> KDLoss:
    """The loss on the student's outputs for a resolved ``method`` (``logits`` or ``regression``)."""
    if method == "logits":
        return logits_loss(params.temperature, params.alpha, params.use_labels)
    return regression_loss(params.alpha, params.use_labels)


def resolve_method(method: str, task: str) -> str:
    """``auto`` → ``logits`` for classification, ``regression`` otherwise."""
    if method == "auto":
        return "logits" if task == "classification" else "regression"
    return method


# ----------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """What ``fit`` runs for one method.

    model: trained by ``fit``: the student itself, or a wrapper that also holds
        trainable parts that are discarded afterwards (hint's projection).
    loss_fn: ``loss(outputs, y, *targets)``.
    targets: teacher-side tensors aligned with the training split, computed once.
    pretrain_loss: a first training phase's loss (FitNets' hint-only stage), or None.
    """

    model: nn.Module
    loss_fn: KDLoss
    targets: list[torch.Tensor]
    pretrain_loss: KDLoss | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def student(self, model: nn.Module) -> nn.Module:
        return model.student if isinstance(model, _Hinted) else model


def _logits_plan(student: nn.Module, teacher: nn.Module, X: torch.Tensor, teacher_out: torch.Tensor, task: Task, params: DistillParams) -> Plan:
    return Plan(student, output_loss("logits", params), [teacher_out])


def _regression_plan(
    student: nn.Module, teacher: nn.Module, X: torch.Tensor, teacher_out: torch.Tensor, task: Task, params: DistillParams
) -> Plan:
    return Plan(student, output_loss("regression", params), [teacher_out])


def named_module(model: nn.Module, name: str, key: str) -> nn.Module:
    """The submodule called ``name``; a ParamsError naming ``key`` and the choices if there is none."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        choices = ", ".join(repr(n) for n in modules if n)
        raise ParamsError(f"{key} {name!r} is not a module of the model: use one of {choices}")
    return modules[name]


@torch.no_grad()
def layer_outputs(model: nn.Module, module: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs of ``module`` (a submodule of ``model``) for all of ``X``, on CPU."""
    grabbed: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: grabbed.append(out.detach().float().cpu()))
    try:
        predict(model, X, batch_size)
    finally:
        handle.remove()
    return torch.cat(grabbed)


class _Hinted(nn.Module):
    """The student plus the hint projection, trained together by ``fit``.

    ``forward`` returns the student's output (so ``fit``'s validation sees the
    student alone) and leaves the projected guided layer in ``self.hint``.
    """

    def __init__(self, student: nn.Module, guided: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.projection = projection
        self._feature: torch.Tensor | None = None
        self.hint: torch.Tensor | None = None
        self._handle = guided.register_forward_hook(self._grab)

    def _grab(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._feature = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.student(x)
        self.hint = self.projection(self._feature)
        return out

    def detach_hook(self) -> None:
        self._handle.remove()


def _projection(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> nn.Module:
    """A 1×1 convolution between feature maps of equal size, else a linear map of the flattened features."""
    s, t = student_feat.shape[1:], teacher_feat.shape[1:]
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], kernel_size=1)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(s.numel()), int(t.numel())))


def _hint_plan(student: nn.Module, teacher: nn.Module, X: torch.Tensor, teacher_out: torch.Tensor, task: Task, params: DistillParams) -> Plan:
    out_method = "logits" if task == "classification" else "regression"
    base = output_loss(out_method, params)
    t_mod = named_module(teacher, params.teacher_layer, "distill.teacher_layer")
    s_mod = named_module(student, params.student_layer, "distill.student_layer")
    probe = X[:2]
    t_probe = layer_outputs(teacher, t_mod, probe)
    student.eval()
    s_probe = layer_outputs(student, s_mod, probe)
    if not isinstance(t_probe, torch.Tensor) or not isinstance(s_probe, torch.Tensor):
        raise ParamsError("distill.teacher_layer and distill.student_layer must name modules that output one tensor")
    projection = _projection(s_probe, t_probe)
    # Same seed → same projection init; the student itself was initialised before.
    model = _Hinted(student, s_mod, projection)
    flat = isinstance(projection, nn.Sequential)

    def target_shape(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1) if flat else t

    per_sample = t_probe[0].numel() * 4
    if per_sample * len(X) <= MAX_STORED_HINT_BYTES:
        targets = [teacher_out, target_shape(layer_outputs(teacher, t_mod, X))]

        def hint_target(extra: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return extra[0]
    else:
        # Too large to keep for the whole transfer set: recompute the teacher's layer
        # on each batch (the inputs travel as an extra target).
        log.info("distill: teacher layer %s recomputed per batch (%d values per sample)", params.teacher_layer, per_sample // 4)
        targets = [teacher_out, X]

        def hint_target(extra: tuple[torch.Tensor, ...]) -> torch.Tensor:
            xb = extra[0]
            with torch.no_grad():
                teacher.to(xb.device)
                return target_shape(layer_outputs(teacher, t_mod, xb, batch_size=len(xb)).to(xb.device))

    def hint_loss(*extra: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model.hint, hint_target(extra))

    def loss(out: torch.Tensor, y: torch.Tensor, t_out: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return base(out, y, t_out) + params.weight * hint_loss(*extra)

    def pretrain(out: torch.Tensor, y: torch.Tensor, t_out: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return hint_loss(*extra)

    return Plan(model, loss, targets, pretrain_loss=pretrain if params.hint_epochs else None, close=model.detach_hook)


#: method name → plan(student, teacher, X_train, teacher_out, task, params)
PLANS: dict[str, Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor, Task, DistillParams], Plan]] = {
    "logits": _logits_plan,
    "regression": _regression_plan,
    "hint": _hint_plan,
}


def check_method(method: str, task: Task) -> str:
    """Resolve ``auto`` and refuse a method the task cannot use."""
    method = resolve_method(method, task)
    if method == "logits" and task != "classification":
        raise ParamsError("distill.method 'logits' needs class labels but the data is a regression task: use 'regression' or 'auto'")
    if method not in PLANS:
        raise ParamsError(f"distill.method {method!r} is unknown: use one of auto, {', '.join(PLANS)}")
    return method


def train_student(
    student: nn.Module,
    params: DistillParams,
    env: Env,
    *,
    after_step: Callable[[nn.Module], None] | None = None,
    where: str = "distill",
) -> FitResult:
    """Train the float ``student`` in place from ``env``'s teacher on the training split (the transfer set).

    Args:
        params: a ``distill`` params variant (``schemas.distill``): method, its keys,
            ``use_labels``, ``epochs``, ``batch_size``, ``optimizer``.
        env: the data, the teacher (``hint`` reads its layers) and its outputs on the
            training split (computed from the teacher when not given).
        after_step: hook called on the student after every optimizer step (e.g.
            ``artifacts.keep_constraints`` to keep a compressed student's zeros and
            quantization).

    Raises:
        ParamsError: the method does not fit the task, or hint names unknown layers.
    """
    data = env.data(where)
    method = check_method(params.method, data.task)
    X, _ = data.tensors("train")
    teacher_out = env.soft_targets(where)
    if env.teacher is None and method == "hint":
        raise ParamsError("distill.method hint reads the teacher's layers: it needs the teacher model")
    teacher = env.teacher.eval() if env.teacher is not None else None
    plan = PLANS[method](student, teacher, X, teacher_out, data.task, params)
    hook = None if after_step is None else (lambda m: after_step(plan.student(m)))
    common = dict(
        batch_size=params.batch_size, optimizer=params.optimizer, seed=env.seed, device=env.device,
        extra_targets=plan.targets, after_step=hook,
    )
    try:
        if plan.pretrain_loss is not None:
            fit(plan.model, data, epochs=params.hint_epochs, where=where, loss_fn=plan.pretrain_loss, **common)
        result = fit(plan.model, data, epochs=params.epochs, where=where, loss_fn=plan.loss_fn, on_epoch=env.on_epoch, **common)
    finally:
        plan.close()
    student.cpu().eval()
    return result


def distill(student: nn.Module, header: ModelHeader, params: DistillParams, env: Env) -> tuple[nn.Module, ModelHeader]:
    """Every ``distill.method``'s entry point: train ``student`` under the teacher, keeping what its header says.

    A compressed student (pruned, quantized, weight-shared) trains as its float
    equivalent with its zeros and quantization kept (``artifacts.keep_constraints``)
    and is quantized again the same way after (``artifacts.from_float``): the result
    is the same small model with recovered accuracy. A new student (a header with no
    transforms) simply trains.
    """
    trainable = to_float(student, header)
    train_student(trainable, params, env, after_step=keep_constraints(trainable, header))
    return from_float(trainable, header), header

