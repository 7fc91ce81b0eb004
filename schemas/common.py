"""Building blocks shared by the params sections: strict sections, method registries, model specs."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, model_validator


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)


def registry(key: str, default: str, *variants: type[Section]) -> Any:
    """A union of variants picked by ``key`` (e.g. ``method``), ``default`` when the key is absent.

    Adding a method is adding one variant here (and its handler in the library).
    """

    def pick(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get(key, default)
        return getattr(value, key, None)

    pick.__name__ = key  # pydantic names it in errors: "method()"
    members = tuple(Annotated[v, Tag(get_args(v.model_fields[key].annotation)[0])] for v in variants)
    return Annotated[Union[members], Discriminator(pick)]  # noqa: UP007 - built at run time


# -------------------------------------------------------------------------- model


#: A teacher's default training epochs (``train_teacher.epochs``); a new distillation student's too.
TEACHER_EPOCHS = 20

#: Widest layer a spec may ask for (a bound on what a model file can make the loader allocate).
MAX_WIDTH = 2**20
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]


class MLPSpec(Section):
    arch: Literal["mlp"] = Field("mlp", description="Fully connected ReLU network (LeNet-300-100 is hidden: [300, 100]).")
    hidden: list[Width] = Field(default_factory=lambda: [64], max_length=64, description="Width of each hidden layer.")


class LeNet5Spec(Section):
    arch: Literal["lenet5"] = Field(description="Caffe's LeNet-5 (conv20-pool-conv50-pool-fc500-fc) for image inputs.")
    padding: int | None = Field(
        None, ge=0, le=4, description="Convolution padding; null = 0 for inputs of 16 px or more, else 2 (8×8 digits)."
    )


class ModuleSpec(Section):
    arch: Literal["module"] = Field(description="Your own torch.nn.Module class, built as Class(**kwargs).")
    import_: str = Field(
        alias="import",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Where the class lives, as 'package.module:ClassName' (importable from the project root).",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the class.")


class MobileNetSpec(Section):
    arch: Literal["mobilenet"] = Field(
        description="Residual CNN of MobileNetV2 blocks (1×1 expand, 3×3 depthwise, 1×1 project, BatchNorm, "
        "residual adds), global average pooling, Linear; for image inputs."
    )
    widths: list[Width] = Field(
        default_factory=lambda: [16, 32, 64], min_length=1, max_length=8,
        description="Channels of each stage; every stage after the first starts by halving the resolution.",
    )
    blocks: int = Field(2, ge=1, le=16, description="Inverted-residual blocks per stage.")
    expansion: int = Field(2, ge=1, le=8, description="Width of a block's depthwise layer, as a multiple of its input channels.")
    stem_stride: Literal[1, 2] | None = Field(
        None, description="Stride of the first convolution; null = 2 for inputs of 16 px or more, else 1 (8×8 digits)."
    )


class _RNNSpec(Section):
    hidden: Width = Field(128, description="Hidden units of each recurrent layer.")
    layers: int = Field(1, ge=1, le=8, description="Stacked recurrent layers (one nn.LSTM/nn.GRU with num_layers).")


class LSTMSpec(_RNNSpec):
    arch: Literal["lstm"] = Field(
        description="LSTM over the rows of an image (sequential MNIST: 28 steps of 28 pixels) or over "
        "[steps, features] inputs, classified from the last step."
    )


class GRUSpec(_RNNSpec):
    arch: Literal["gru"] = Field(description="As lstm, with GRU cells.")


class TransformerSpec(Section):
    arch: Literal["transformer"] = Field(
        description="Transformer encoder on image patches (ViT): patch embedding, multi-head self-attention, "
        "LayerNorm, MLP, mean pooling, Linear."
    )
    patch: int | None = Field(
        None, ge=1, le=64, description="Side of a square patch in pixels; it must divide the image. null = a quarter "
        "of the image side (7 for MNIST, 2 for 8×8 digits: 16 patches)."
    )
    dim: Width = Field(64, description="Embedding width of every token.")
    depth: int = Field(2, ge=1, le=24, description="Encoder blocks.")
    heads: int = Field(4, ge=1, le=64, description="Attention heads per block (dim must be a multiple of heads).")
    mlp: Width = Field(128, description="Hidden width of each block's MLP.")

    @model_validator(mode="after")
    def _heads(self) -> TransformerSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


ModelSpec = registry("arch", "mlp", MLPSpec, LeNet5Spec, MobileNetSpec, LSTMSpec, GRUSpec, TransformerSpec, ModuleSpec)


# ------------------------------------------------------------------ optimizers


class ConstantLR(Section):
    name: Literal["constant"] = Field("constant", description="The learning rate stays `lr`.")


class StepLR(Section):
    name: Literal["step"] = Field(description="Multiply the learning rate by `gamma` every `step_size` epochs.")
    step_size: PositiveInt = Field(description="Epochs between two decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="Factor applied at each decay.")


class MultiStepLR(Section):
    name: Literal["multistep"] = Field(description="Multiply the learning rate by `gamma` at each epoch in `milestones`.")
    milestones: list[PositiveInt] = Field(min_length=1, description="Epochs (counted from the start of the training run) at which the rate decays, increasing.")
    gamma: float = Field(0.1, gt=0, le=1, description="Factor applied at each milestone.")

    @model_validator(mode="after")
    def _increasing(self) -> MultiStepLR:
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        return self


class CosineLR(Section):
    name: Literal["cosine"] = Field(description="Cosine annealing from `lr` to `min_lr` over the training run's epochs.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the last epoch.")


LRSchedule = registry("name", "constant", ConstantLR, StepLR, MultiStepLR, CosineLR)


class Optimizer(Section):
    name: Literal["sgd", "adam"] = Field("sgd", description="sgd (with momentum) or adam.")
    lr: float = Field(0.05, gt=0, le=10, description="Learning rate (the starting rate when `lr_schedule` decays it).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    lr_schedule: LRSchedule = Field(
        default_factory=ConstantLR,
        description="How the learning rate changes per epoch of each training run (constant, step, multistep, cosine). "
        "A run is one call of the training loop: the teacher's training, each fine-tuning phase of a pruning "
        "schedule, centroid fine-tuning, distillation; the schedule restarts with each.",
    )


class Finetune(Section):
    epochs: int = Field(2, ge=0, description="Fine-tuning epochs after the stage's change (0 = none).")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for fine-tuning.")
    distill_from_teacher: bool = Field(
        False, description="Add the teacher's soft targets (models/train_teacher) to the fine-tuning loss (Hinton et al. 2015)."
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature of the teacher's soft targets (with distill_from_teacher).")
    alpha: float = Field(
        0.7, ge=0, le=1, description="Weight of the soft-target loss; 1 - alpha weighs the labels (with distill_from_teacher)."
    )
