"""Every path the pipeline reads or writes, spelled in one place.

dvc.yaml spells the same paths for DVC; ``tests/test_dvc_yaml.py`` checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Stage names in chain order: DVC stage, params section, tasks module, Prefect task
#: and output folder all use these names.
STAGES: tuple[str, ...] = ("data", "train_teacher", "prune", "quantize", "distill", "evaluate")

#: Model-producing stages and the variant name each one's model has in metrics.json.
VARIANTS: dict[str, str] = {
    "train_teacher": "teacher",
    "prune": "pruned",
    "quantize": "quantized",
    "distill": "student",
}

#: Each model stage reads the model of the stage before it.
UPSTREAM: dict[str, str] = {"prune": "train_teacher", "quantize": "prune", "distill": "quantize"}

MODEL_FILE = "model.pt"
#: Extension of packed (Deep Compression) model files.
PACKED_SUFFIX = ".sfz"


@dataclass(frozen=True)
class StagePaths:
    """Paths under a project root."""

    root: Path

    @property
    def splits(self) -> Path:
        return self.root / "data" / "prepared" / "splits.npz"

    def model_dir(self, stage: str) -> Path:
        return self.root / "models" / stage

    def model(self, stage: str) -> Path:
        return self.model_dir(stage) / MODEL_FILE

    @property
    def teacher_outputs(self) -> Path:
        """The teacher's outputs on the training split (the transfer set), written once by train_teacher."""
        return self.model_dir("train_teacher") / "outputs.pt"

    def manifest(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}.json"

    def live(self, stage: str) -> Path:
        """dvclive folder with the stage's per-epoch curves."""
        return self.root / "reports" / "live" / stage

    def packed(self, variant: str) -> Path:
        """The packed (.sfz) file evaluate writes for ``variant``."""
        return self.model_dir("evaluate") / f"{variant}{PACKED_SUFFIX}"

    @property
    def pack_summary(self) -> Path:
        return self.model_dir("evaluate") / "pack.json"

    @property
    def sensitivity(self) -> Path:
        """Folder of the prune stage's per-layer sensitivity analysis."""
        return self.root / "reports" / "sensitivity"

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "reports" / "report.md"

    @property
    def variants_plot(self) -> Path:
        return self.root / "reports" / "plots" / "variants.json"

    @property
    def changes(self) -> Path:
        """Folder of evaluate's "what compression changed" report: changes.json, report.md,
        the dvc plots' data (delta.json, predictions.json, calibration.json) and images/."""
        return self.root / "reports" / "changes"

    @property
    def changes_json(self) -> Path:
        return self.changes / "changes.json"

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, as written into manifests."""
        return path.relative_to(self.root).as_posix()
