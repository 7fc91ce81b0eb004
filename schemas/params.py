"""The params.yaml contract: one frozen model per stage section.

Every field carries a description: ``shrinkflow schema`` exports them as JSON Schema
for editors, and the README's parameter reference is generated from the same text.
Unknown keys are rejected (``extra="forbid"``) so a typo never silently falls back
to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def registry(key: str, default: str, *variants: type[_Section]) -> Any:
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


# --------------------------------------------------------------------------- data


class _DataBase(_Section):
    path: str = Field(
        "data/raw",
        description=(
            "File or folder the source reads (npz: the .npz file; mnist: the folder holding "
            "the four IDX .gz files). DVC tracks it as the data stage's dependency, so a "
            "changed or added file re-runs the chain. digits and synthetic-regression read "
            "nothing from it."
        ),
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=0.9,
        description="Share of the training split held out for validation (model selection, never the test split).",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.9,
        description="Share held out for testing where the source has no test split of its own (digits, synthetic-regression, npz without X_test).",
    )


class DigitsData(_DataBase):
    source: Literal["digits"] = Field("digits", description="scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes).")


class MnistData(_DataBase):
    source: Literal["mnist"] = Field(description="MNIST: a folder (``path``) with the four original IDX .gz files.")
    train_limit: PositiveInt | None = Field(
        None, description="Use only the first N training images (quick runs); null = all 60,000."
    )


class SyntheticRegressionData(_DataBase):
    source: Literal["synthetic-regression"] = Field(
        description="Toy regression: 10 Gaussian features → 1 target drawn from a fixed random network plus noise."
    )
    n_samples: PositiveInt = Field(2000, ge=50, description="Number of samples generated.")
    noise: float = Field(0.05, ge=0, description="Standard deviation of the Gaussian noise added to the target.")


class NpzData(_DataBase):
    source: Literal["npz"] = Field(
        description=(
            "Your own arrays in an .npz file (``path``): ``X`` and ``y`` (optionally ``X_test`` "
            "and ``y_test``). Integer ``y`` means classification, float ``y`` regression."
        )
    )


DataParams = registry("source", "digits", DigitsData, MnistData, SyntheticRegressionData, NpzData)


# -------------------------------------------------------------------------- model


class MLPSpec(_Section):
    arch: Literal["mlp"] = Field("mlp", description="Fully connected ReLU network (LeNet-300-100 is hidden: [300, 100]).")
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64], description="Width of each hidden layer.")


class LeNet5Spec(_Section):
    arch: Literal["lenet5"] = Field(description="Caffe's LeNet-5 (conv20-pool-conv50-pool-fc500-fc) for image inputs.")
    padding: int | None = Field(
        None, ge=0, le=4, description="Convolution padding; null = 0 for inputs of 16 px or more, else 2 (8×8 digits)."
    )


class ModuleSpec(_Section):
    arch: Literal["module"] = Field(description="Your own torch.nn.Module class, built as Class(**kwargs).")
    import_: str = Field(
        alias="import",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Where the class lives, as 'package.module:ClassName' (importable from the project root).",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the class.")


ModelSpec = registry("arch", "mlp", MLPSpec, LeNet5Spec, ModuleSpec)


class Optimizer(_Section):
    name: Literal["sgd", "adam"] = Field("sgd", description="sgd (with momentum) or adam.")
    lr: float = Field(0.05, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")


class Finetune(_Section):
    epochs: int = Field(2, ge=0, description="Fine-tuning epochs after the stage's change (0 = none).")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for fine-tuning.")


# ---------------------------------------------------------------------- stages


class TrainTeacherParams(_Section):
    model: ModelSpec = Field(default_factory=MLPSpec, description="Architecture of the teacher.")
    epochs: PositiveInt = Field(20, description="Training epochs.")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer settings.")
    checkpoint: str | None = Field(
        None,
        description=(
            "Import an already-trained model instead of training: a plain state dict (.pt, "
            "loaded with weights_only=True) matching ``model``, or a shrinkflow model file. "
            "Track the file with ``dvc add`` so a new checkpoint re-runs the chain."
        ),
    )


class _PruneBase(_Section):
    enabled: bool = Field(True, description="false passes the teacher through unchanged.")
    sparsity: float = Field(0.8, gt=0, lt=1, description="Fraction of prunable weights (Linear/Conv weights, not biases) set to zero.")
    finetune: Finetune = Field(default_factory=Finetune, description="Fine-tuning after pruning; pruned weights stay exactly zero.")


class MagnitudePrune(_PruneBase):
    method: Literal["magnitude"] = Field("magnitude", description="Remove the weights of smallest absolute value.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one threshold across all layers; layer: each layer pruned to ``sparsity``."
    )


PruneParams = registry("method", "magnitude", MagnitudePrune)


class _QuantizeBase(_Section):
    enabled: bool = Field(True, description="false passes the pruned model through unchanged.")


class DynamicQuant(_QuantizeBase):
    method: Literal["dynamic"] = Field(
        "dynamic", description="int8 weights for Linear layers, activations quantized at run time."
    )
    bits: Literal[8] = Field(8, description="Weight bit width (dynamic supports 8).")


QuantizeParams = registry("method", "dynamic", DynamicQuant)


class DistillParams(_Section):
    enabled: bool = Field(True, description="false passes the quantized model through unchanged.")
    student: Literal["compressed"] | ModelSpec = Field(
        "compressed",
        description=(
            "'compressed': keep training the quantize output under the teacher's soft targets, "
            "keeping its zeros and its quantization; or a model spec (e.g. {arch: mlp, hidden: [32]}) "
            "for a new, smaller student trained from the teacher."
        ),
    )
    method: Literal["auto", "logits", "regression"] = Field(
        "auto",
        description="logits: Hinton's softened-softmax KL (classification); regression: MSE to the teacher's outputs; auto picks by task.",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T for the soft targets (soft loss scaled by T²).")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft (teacher) loss; 1 - alpha weighs the hard-label loss.")
    epochs: int = Field(3, ge=0, description="Distillation epochs.")
    batch_size: PositiveInt = Field(64, description="Mini-batch size.")
    optimizer: Optimizer = Field(default_factory=lambda: Optimizer(lr=0.01), description="Optimizer for distillation.")


class Gates(_Section):
    max_accuracy_drop: float | None = Field(
        0.05, ge=0, le=1, description="Largest allowed accuracy drop of the final model vs the teacher (fraction, 0.01 = 1 pp); null = no gate."
    )
    max_mse_ratio: float | None = Field(
        None, gt=0, description="Regression: largest allowed final-model MSE as a multiple of the teacher's; null = no gate."
    )
    min_compression_ratio: float | None = Field(
        None, gt=0, description="Smallest allowed teacher-size / final-size ratio, from the files on disk; null = no gate."
    )


class EvaluateParams(_Section):
    batch_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [1, 256], min_length=1, description="Batch sizes at which CPU latency is measured."
    )
    threads: PositiveInt = Field(1, description="torch.set_num_threads during latency measurement (stated in the report).")
    min_run_time: float = Field(
        0.3, gt=0, le=60, description="Seconds of timing per variant and batch size (torch.utils.benchmark blocked_autorange)."
    )
    gates: Gates = Field(default_factory=Gates, description="Quality gates checked on the final model; results in reports/evaluate.json.")


class Params(_Section):
    """Everything the pipeline does, in one file."""

    seed: int = Field(0, ge=0, description="Seed for data splits, initialisation and shuffling.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto takes CUDA when present. Evaluation is always on CPU."
    )
    data: DataParams = Field(default_factory=DigitsData, description="Where the data comes from and how it is split.")
    train_teacher: TrainTeacherParams = Field(default_factory=TrainTeacherParams, description="Train (or import) the teacher.")
    prune: PruneParams = Field(default_factory=MagnitudePrune, description="Prune the teacher.")
    quantize: QuantizeParams = Field(default_factory=DynamicQuant, description="Quantize the pruned model.")
    distill: DistillParams = Field(default_factory=DistillParams, description="Distill from the teacher.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Measure every variant side by side.")

    @model_validator(mode="after")
    def _task_fits_method(self) -> Params:
        if isinstance(self.data, SyntheticRegressionData) and self.distill.method == "logits":
            raise ValueError(
                "distill.method 'logits' needs class labels, but data.source synthetic-regression is "
                "a regression task: use distill.method: regression (or auto)"
            )
        return self
