"""params.yaml `data` section: where the data comes from and how it is split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from schemas.common import Section, registry


class _DataBase(Section):
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
            "and ``y_test``), or a folder of such files, concatenated in name order (drop new "
            "batches there for retraining). See ``task`` for how ``y`` is read."
        )
    )
    task: Literal["auto", "classification", "regression"] = Field(
        "auto",
        description=(
            "auto: integer ``y`` means classification (labels 0..K-1), float ``y`` regression; other "
            "label types (strings, booleans) are refused with the fix. classification: ``y`` holds class "
            "labels of any type (integers 0..K-1 are kept; anything else, e.g. strings, becomes 0..K-1 "
            "in sorted order); regression: ``y`` holds numbers (one or more targets per row)."
        ),
    )


DataParams = registry("source", "digits", DigitsData, MnistData, SyntheticRegressionData, NpzData)
