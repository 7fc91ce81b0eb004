"""params.yaml `prune` section: one variant per `prune.method`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.common import Finetune, Optimizer, Section, registry

_PATTERNS = (
    "Shell-style patterns (fnmatch, case-sensitive) on module names as model.named_modules() spells them, "
    "e.g. 'net.5' or 'features.*'"
)


class _Common(Section):
    """What every pruning method has."""

    enabled: bool = Field(True, description="false passes the teacher through unchanged.")
    skip: list[str] = Field(default_factory=list, description=f"Layers never pruned. {_PATTERNS}.")
    dead_units: bool = Field(
        True,
        description="Remove the neurons/channels pruning left without weights (all incoming, or all outgoing, weights zero), "
        "with their biases and the next layer's matching inputs; a dead unit's constant output is folded into the next "
        "layer's bias. The file stores the smaller architecture; predictions stay the same.",
    )
    sensitivity: bool = Field(
        False, description="Also run a per-layer sensitivity analysis on the teacher (reports/sensitivity/: JSON, markdown, PNG)."
    )
    sensitivity_sparsities: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95],
        min_length=1,
        description="Sparsities at which each layer is pruned alone for the sensitivity analysis.",
    )
    finetune: Finetune = Field(default_factory=Finetune, description="Fine-tuning after pruning; pruned weights stay exactly zero.")

    @model_validator(mode="after")
    def _levels(self):  # noqa: ANN202 - pydantic validator
        if any(not 0 < s < 1 for s in self.sensitivity_sparsities):
            raise ValueError("sensitivity_sparsities: every value must be in (0, 1)")
        return self


class _PruneBase(_Common):
    sparsity: float = Field(0.8, gt=0, lt=1, description="Fraction of prunable weights set to zero (Linear/Conv weights, LSTM/GRU input and recurrent matrices, attention input projections; never biases or norms).")
    layers: dict[str, float] = Field(
        default_factory=dict,
        description=f"Per-layer targets overriding `sparsity`: {{pattern: sparsity}}. {_PATTERNS}; the last matching pattern wins.",
    )
    schedule: Literal["one-shot", "iterative", "gradual"] = Field(
        "one-shot",
        description="one-shot: prune once, then fine-tune; iterative: `rounds` × (prune a share, fine-tune `finetune.epochs`); "
        "gradual: Zhu & Gupta 2017 cubic ramp from `initial_sparsity` to `sparsity` during fine-tuning.",
    )
    rounds: PositiveInt = Field(
        3, description="iterative: number of prune + fine-tune rounds; each removes the same share of the remaining weights."
    )
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="gradual: sparsity at the first fine-tuning step.")
    ramp_fraction: float = Field(
        0.75, gt=0, le=1, description="gradual: share of the fine-tuning steps over which sparsity ramps up; the rest recovers at the final sparsity."
    )
    prune_every: PositiveInt = Field(
        10,
        description="gradual: optimizer steps between two mask updates (unstructured methods; structured pruning "
        "advances the ramp once per epoch, since the layers change shape).",
    )
    steps: list[float] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="iterative: explicit per-step targets, as the share of each layer's final target reached after "
        "each step (increasing, the last 1.0), e.g. [0.5, 0.7, 0.85, 0.95, 1.0]; replaces `rounds`. null = `rounds` "
        "steps that each remove the same share of the remaining weights.",
    )
    step_epochs: list[int] | None = Field(
        None,
        description="iterative: fine-tuning epochs after each step (one value per step, e.g. [4, 4, 4, 4, 16] to retrain "
        "longer at the final sparsity); null = `finetune.epochs` after every step.",
    )

    @model_validator(mode="after")
    def _steps(self):  # noqa: ANN202 - pydantic validator
        if (self.steps is not None or self.step_epochs is not None) and self.schedule != "iterative":
            raise ValueError(f"steps and step_epochs belong to schedule: iterative (schedule is {self.schedule!r})")
        if self.steps is not None:
            if any(not 0 < s <= 1 for s in self.steps) or any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
                raise ValueError(f"steps must increase within (0, 1], got {self.steps}")
            if self.steps[-1] != 1.0:
                raise ValueError(f"the last of steps must be 1.0 (the final targets), got {self.steps[-1]}")
        if self.step_epochs is not None:
            n = len(self.steps) if self.steps is not None else self.rounds
            if len(self.step_epochs) != n or any(e < 0 for e in self.step_epochs):
                raise ValueError(f"step_epochs needs {n} epoch counts ≥ 0 (one per step), got {self.step_epochs}")
        return self

    def step_plan(self) -> list[tuple[float, int]]:
        """iterative: (share of the final targets, fine-tuning epochs) for each step."""
        shares = self.steps if self.steps is not None else [
            (1.0 - (1.0 - self.sparsity) ** (r / self.rounds)) / self.sparsity for r in range(1, self.rounds + 1)
        ]
        epochs = self.step_epochs if self.step_epochs is not None else [self.finetune.epochs] * len(shares)
        return list(zip(shares, epochs, strict=True))

    @model_validator(mode="after")
    def _check(self):  # noqa: ANN202 - pydantic validator
        for p, s in self.layers.items():
            if not 0 <= s < 1:
                raise ValueError(f"layers[{p!r}] = {s}: a sparsity must be in [0, 1)")
        if self.schedule == "gradual":
            if self.initial_sparsity >= self.sparsity:
                raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must be below sparsity ({self.sparsity}) for schedule: gradual")
            if self.finetune.epochs == 0:
                raise ValueError("schedule: gradual prunes during fine-tuning: set finetune.epochs ≥ 1 or use schedule: one-shot")
        return self


class _Unstructured(_PruneBase):
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: one ranking across all layers not named in `layers`/`skip`; layer: each layer pruned to `sparsity`.",
    )
    allocation: Literal["uniform", "auto"] = Field(
        "uniform",
        description="auto: per-layer sparsities chosen from a sensitivity analysis of the teacher so that the least sensitive "
        "layers are pruned most while the total meets `sparsity` (explicit `layers` and `skip` still apply).",
    )


    @model_validator(mode="after")
    def _auto(self):  # noqa: ANN202 - pydantic validator
        if self.allocation == "auto" and max(self.sensitivity_sparsities) < self.sparsity:
            raise ValueError(
                f"allocation: auto needs sensitivity_sparsities to reach sparsity ({self.sparsity}); "
                f"the largest is {max(self.sensitivity_sparsities)}: add a value ≥ {self.sparsity}"
            )
        return self


class MagnitudePrune(_Unstructured):
    method: Literal["magnitude"] = Field("magnitude", description="Remove the weights of smallest absolute value.")


class RandomPrune(_Unstructured):
    method: Literal["random"] = Field(
        description="Baseline: a random binary mask per layer (same targets as magnitude), to show what the criterion is worth."
    )
    scope: Literal["global", "layer"] = Field(
        "layer", description="layer: each layer loses exactly `sparsity` of its weights at random; global: drawn from all layers pooled."
    )


class StructuredPrune(_PruneBase):
    method: Literal["structured"] = Field(
        description="Remove whole neurons/channels (Torch-Pruning); layers get physically smaller and faster."
    )
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of neurons (Linear) / channels (Conv) removed; the output layer keeps its size.")
    scope: Literal["global", "layer"] = Field(
        "layer", description="layer: every layer loses `sparsity` of its channels; global: channels of all layers ranked together."
    )
    norm: Literal[1, 2] = Field(2, description="Importance of a channel group: its L1 (1) or L2 (2) weight norm.")
    max_layer_sparsity: float = Field(
        0.9, gt=0, lt=1, description="global scope: no layer loses more than this fraction of its channels."
    )


class VariationalPrune(_Common):
    method: Literal["variational"] = Field(
        description="Sparse variational dropout (Molchanov et al. 2017): trains, from the teacher, a Gaussian dropout "
        "rate alpha per weight (log sigma^2 per weight, local reparameterization, the paper's KL approximation) and "
        "removes the weights whose log alpha exceeds `threshold`. The sparsity is learned, not set."
    )
    threshold: float = Field(
        3.0, ge=-4, le=8,
        description="Weights with log alpha above this are removed (3 in the paper: dropout rate above 95 %). Lower "
        "removes more.",
    )
    kl_weight: float = Field(
        1.0, gt=0, le=1000,
        description="Weight of the KL term against the data term (1 = the variational lower bound); above 1 trades "
        "accuracy for sparsity.",
    )
    kl_warmup: float = Field(
        0.3, ge=0, le=1,
        description="Share of the training steps over which the KL weight rises linearly from 0 to `kl_weight` (the "
        "paper's warm-up); 0 = full weight from the first step.",
    )
    init_log_sigma2: float = Field(
        -10.0, ge=-20, le=0, description="Initial log sigma^2 of every weight (the paper: -10, i.e. nearly no noise)."
    )
    finetune: Finetune = Field(
        default_factory=lambda: Finetune(epochs=20, batch_size=100, optimizer=Optimizer(name="adam", lr=1e-3)),
        description="The variational training itself (weights start from the teacher; Adam as in the paper); with "
        "distill_from_teacher the data term uses the teacher's soft targets. epochs ≥ 1.",
    )

    @model_validator(mode="after")
    def _trains(self):  # noqa: ANN202 - pydantic validator
        if self.finetune.epochs < 1:
            raise ValueError("method: variational learns which weights to drop by training: set finetune.epochs ≥ 1")
        return self


PruneParams = registry("method", "magnitude", MagnitudePrune, RandomPrune, StructuredPrune, VariationalPrune)
