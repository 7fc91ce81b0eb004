"""Run params presets through the product, for the bench scripts: `dvc repro` in a fresh clone.

Every figure a bench script publishes comes from here: a clone of this repository's
HEAD (committed code only, as a new user gets it), the preset copied over its
params.yaml with ``--set``-style overrides (seed, data path, ...), then `dvc repro`;
the figures are read from what the stages wrote: ``reports/metrics.json`` (typed),
the stage manifests and ``models/evaluate/pack.json``. Clones share one DVC cache
(``cache_dir``), so a teacher already trained with the same data, params and code is
restored from DVC's run-cache instead of being trained again.

    from presets import run_preset
    run = run_preset("examples/deep-compression-lenet300/params.yaml",
                     ["seed=1", "data.path=/data/mnist"], workdir)
    run.metrics["student"].size_bytes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from schemas.metrics import Metrics  # noqa: E402
from schemas.outputs import STAGE_OUTPUTS, StageOutput, read_manifest  # noqa: E402
from schemas.paths import StagePaths  # noqa: E402
from shrinkflow.config import apply_to_params_file  # noqa: E402


def env(workspace: Path | None = None) -> dict[str, str]:
    """The environment the stages run in: this venv first on PATH, analytics off, no Prefect server.

    With ``workspace``, the clone's own code comes first on PYTHONPATH: the venv's editable
    install points at this checkout, whose working tree may differ from the committed HEAD
    the clone holds.
    """
    out = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    out.pop("PREFECT_API_URL", None)
    if workspace is not None:
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(workspace), os.environ.get("PYTHONPATH", "")) if p)
    for key, value in (("GIT_AUTHOR_NAME", "shrinkflow bench"), ("GIT_AUTHOR_EMAIL", "bench@shrinkflow.invalid")):
        out.setdefault(key, value)
        out.setdefault(key.replace("AUTHOR", "COMMITTER"), value)
    return out


def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def host() -> dict[str, Any]:
    """Where the figures were measured (stated beside every timing)."""
    import torch

    from shrinkflow.measure import cpu_model

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": head(), "load_average_at_start": load}


def clone(dest: Path, cache_dir: Path | None) -> Path:
    """A fresh clone of HEAD at ``dest``, its DVC cache pointed at ``cache_dir`` (shared between runs)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    dvc = [str(BIN / "dvc")]
    subprocess.run([*dvc, "config", "--local", "core.analytics", "false"], cwd=dest, check=True, env=env())
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([*dvc, "cache", "dir", "--local", str(cache_dir)], cwd=dest, check=True, env=env())
    return dest


@dataclass
class PresetRun:
    """What one `dvc repro` of a preset produced."""

    preset: str
    overrides: list[str]
    workspace: Path
    seconds: float
    ran: list[str]
    metrics: Metrics
    manifests: dict[str, StageOutput] = field(default_factory=dict)
    pack: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """How a user reproduces this run (the data folder named generically)."""
        sets = " ".join(f"--set {o}" if not o.startswith("data.path=") else "--set data.path=PATH/TO/mnist" for o in self.overrides)
        return f"shrinkflow run --params {self.preset} {sets}".strip()

    def cli(self, *args: str) -> str:
        """Run a ``shrinkflow`` command in the workspace (e.g. ``pack``); its stdout."""
        return subprocess.run([str(BIN / "shrinkflow"), *args], cwd=self.workspace, env=env(self.workspace), check=True,
                              capture_output=True, text=True).stdout

    def summary(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "overrides": self.overrides, "command": self.command, "seconds": round(self.seconds, 1),
            "ran": self.ran, "metrics": self.metrics.as_json(), "pack": self.pack,
            "manifests": {k: v.model_dump(mode="json") for k, v in self.manifests.items()},
        }


def run_preset(preset: str, overrides: list[str], workdir: Path, *, cache_dir: Path | None = None, name: str | None = None) -> PresetRun:
    """Clone HEAD into ``workdir/name``, apply ``preset`` + ``overrides`` to its params.yaml, `dvc repro`.

    Raises:
        RuntimeError: `dvc repro` failed (its output's tail in the message; the full log is
            ``<workspace>/repro.log``).
    """
    ws = clone(Path(workdir) / (name or f"run{len(list(Path(workdir).glob('*')))}"), cache_dir)
    apply_to_params_file(ws / "params.yaml", ws / preset, overrides)
    start = time.perf_counter()
    with open(ws / "repro.log", "w") as log:
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=ws, env=env(ws), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    text = (ws / "repro.log").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro of {preset} {overrides} failed:\n{text[-3000:]}")
    ran = [ln.split("'")[1] for ln in text.splitlines() if ln.startswith("Running stage '")]
    paths = StagePaths(ws)
    manifests = {s: read_manifest(s, ws) for s in STAGE_OUTPUTS if paths.manifest(s).is_file()}
    pack = json.loads(paths.pack_summary.read_text()) if paths.pack_summary.is_file() else {}
    return PresetRun(preset, list(overrides), ws, seconds, ran, Metrics.read(ws), manifests, pack)


def error_pct(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (var / n) ** 0.5


def parser(doc: str, results: str, seeds: list[int] | None = None) -> argparse.ArgumentParser:
    """The options every preset bench takes: the MNIST folder, seeds, extra overrides, where clones and results go."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    if seeds is not None:
        ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="another params override (smoke runs), e.g. data.train_limit=2000")
    ap.add_argument("--workdir", type=Path, default=None, help="where the clones go (kept); default: a temp folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / results)
    return ap


def scrub(text: str) -> str:
    """Results name no folder of the machine that made them: the data path and temporary folders become placeholders."""
    # absolute paths only (placeholders stay), bare or JSON-quoted as sweep overrides write them (data.path=\"/...\")
    text = re.sub(r'data\.path=(\\")?/[^"\s\'\\]+(\\")?', "data.path=MNIST_DIR", text)
    return re.sub(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[^/\"\s']+", "TMP", text)


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scrub(json.dumps(payload, indent=2)) + "\n")
