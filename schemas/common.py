"""Building blocks shared by the params sections: strict sections, method registries, model specs."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


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


class MLPSpec(Section):
    arch: Literal["mlp"] = Field("mlp", description="Fully connected ReLU network (LeNet-300-100 is hidden: [300, 100]).")
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64], description="Width of each hidden layer.")


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


ModelSpec = registry("arch", "mlp", MLPSpec, LeNet5Spec, ModuleSpec)


class Optimizer(Section):
    name: Literal["sgd", "adam"] = Field("sgd", description="sgd (with momentum) or adam.")
    lr: float = Field(0.05, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")


class Finetune(Section):
    epochs: int = Field(2, ge=0, description="Fine-tuning epochs after the stage's change (0 = none).")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for fine-tuning.")
