"""Edges and faults, as a user meets them: every scenario through the door a user would use,
with its exit code, its message and whether anything already produced was damaged.

    .venv/bin/python bench/edge_scenarios.py [--workdir DIR]

In a fresh clone of HEAD on the bundled digits (short epochs), after one good
`shrinkflow run`: crafted model files (``predict``, ``pack``, ``shrinkflow.load``), a
disabled stage, ``validate`` on bad imports and bytes, ``run --set`` while `dvc repro`
trains, bad data files, a useless teacher, and the smaller cases. "Nothing lost" compares
the bytes of params.yaml, dvc.lock, every file under models/ and reports/metrics.json before
and after (a scenario that is meant to change the params restores them afterwards). Prints a
markdown table and writes bench/results/edge_scenarios.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml
from presets import BIN, ROOT, clone, env, head, write_results

FAST = ["train_teacher.epochs=3", "prune.finetune.epochs=1", "distill.epochs=1",
        "evaluate.batch_sizes=[1]", "evaluate.min_run_time=0.01"]


def sh(ws: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ws, env=env(ws), capture_output=True, text=True, timeout=timeout)


def cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(ws, str(BIN / "shrinkflow"), *args)


def snapshot(ws: Path) -> dict[str, str]:
    files = [ws / "params.yaml", ws / "dvc.lock", ws / "reports/metrics.json", *sorted((ws / "models").rglob("*"))]
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def message(proc: subprocess.CompletedProcess) -> str:
    """The first line that says what went wrong (or the last line of output when it went right)."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.endswith("FAIL") or " FAIL (" in ln]  # a failed gate
    bad = [i for i, ln in enumerate(lines) if ln.lower().startswith(("error", "invalid", "refused")) or "error:" in ln.lower()]
    if failed:
        return failed[0][:200]
    if not bad:
        return (lines[-1:] or [""])[0][:200]
    i = bad[0]
    text = lines[i] + (" " + lines[i + 1] if lines[i].endswith(":") and i + 1 < len(lines) else "")  # a list of problems follows
    return text[:200]


def evil_header(marker: Path, spec: dict | None = None) -> dict:
    spec = spec or {"arch": "module", "import": "os:system", "kwargs": {"command": f"touch {marker}"}}
    return {"spec": spec, "input_shape": [64], "out_features": 10, "task": "classification"}


def evil_files(ws: Path, marker: Path) -> dict[str, Path]:
    from shrinkflow.artifacts import FORMAT_VERSION
    from shrinkflow.packing import container

    pt = ws / "evil.pt"
    torch.save({"shrinkflow": FORMAT_VERSION, "header": evil_header(marker), "state": {}}, pt)
    big = ws / "big.pt"
    torch.save({"shrinkflow": FORMAT_VERSION, "header": evil_header(marker, {"arch": "mlp", "hidden": [10**9]}), "state": {}}, big)
    import struct

    meta = zlib.compress(json.dumps({"header": evil_header(marker), "tensors": [], "qparams": []}).encode())
    body = struct.pack("<8sHHII", container.MAGIC, 1, 0, len(meta), 0) + meta
    sfz = ws / "evil.sfz"
    sfz.write_bytes(body + struct.pack("<I", zlib.crc32(body)))  # a valid checksum
    noise = ws / "noise.sfz"
    noise.write_bytes(os.urandom(4096))
    return {"pt": pt, "big": big, "sfz": sfz, "noise": noise}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "edge_scenarios.json")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edges-"))
    ws = clone(workdir / "proj", None)
    from shrinkflow.config import apply_to_params_file

    apply_to_params_file(ws / "params.yaml", None, FAST)
    good = cli(ws, "run")
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    marker = ws / "marker"
    files = evil_files(ws, marker)
    np.save(ws / "x.npy", np.zeros((2, 64), dtype=np.float32))
    np.save(ws / "strings.npy", np.array([["a"] * 64] * 2))
    rows: list[dict] = []

    def scenario(name: str, run, *, restore_params: bool = False, expect_change: bool = False, watch: list[str] | None = None) -> None:
        params = (ws / "params.yaml").read_bytes()
        before = snapshot(ws)
        t0 = time.perf_counter()
        proc = run()
        seconds = time.perf_counter() - t0
        after = snapshot(ws)
        if restore_params:
            (ws / "params.yaml").write_bytes(params)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and (watch is None or k in watch))
        tracebacks = (proc.stdout + proc.stderr).count("Traceback")
        rows.append({"scenario": name, "exit": proc.returncode, "message": message(proc), "tracebacks": tracebacks,
                     "marker": marker.exists(), "changed": changed, "expect_change": expect_change, "seconds": round(seconds, 1)})
        print(f"{name}: exit {proc.returncode}, changed {changed or 'nothing'}", flush=True)

    py = str(BIN / "python")
    # 1. crafted model files
    scenario("`.pt` header naming os:system → `shrinkflow predict`", lambda: cli(ws, "predict", str(files["pt"]), "x.npy"))
    scenario("`.sfz` (valid CRC) naming os:system → `shrinkflow pack`", lambda: cli(ws, "pack", str(files["sfz"]), "out.sfz"))
    scenario("`.sfz` naming os:system → `shrinkflow.load`", lambda: sh(ws, py, "-c", f"import shrinkflow; shrinkflow.load({str(files['sfz'])!r})"))
    scenario("`.pt` header with hidden [1e9] → `shrinkflow predict`", lambda: cli(ws, "predict", str(files["big"]), "x.npy"))
    scenario("`.pt` naming os:system as `train_teacher.checkpoint` → `shrinkflow run`",
             lambda: cli(ws, "run", "--set", f"train_teacher.checkpoint={files['pt'].name}"), restore_params=True)
    scenario("4 KB of random bytes as `.sfz` → `shrinkflow predict`", lambda: cli(ws, "predict", str(files["noise"]), "x.npy"))
    # 2. a disabled stage, through the front door (meant to change outputs)
    for stage in ("prune", "distill"):
        scenario(f"`{stage}.enabled: false` → `shrinkflow run`", lambda s=stage: cli(ws, "run", "--set", f"{s}.enabled=false"),
                 restore_params=True, expect_change=True)
    restore = cli(ws, "run")  # back to the good outputs
    assert restore.returncode == 0, restore.stdout[-2000:]
    # 3. validate
    bad = ws / "bad.yaml"

    def validate_with(text: bytes):
        bad.write_bytes(text)
        return cli(ws, "validate", str(bad))

    base = (ws / "params.yaml").read_text()

    def with_model(target: str) -> bytes:
        data = yaml.safe_load(base)
        data["train_teacher"]["model"] = {"arch": "module", "import": target}
        return yaml.safe_dump(data, sort_keys=False).encode()

    scenario("`model.import: no_such_pkg.models:Net` → `shrinkflow validate`", lambda: validate_with(with_model("no_such_pkg.models:Net")))
    scenario("`model.import: os:system` → `shrinkflow validate`", lambda: validate_with(with_model("os:system")))
    scenario("a Latin-1 byte in params → `shrinkflow validate`", lambda: validate_with(base.encode() + b"\n# caf\xe9\n"))
    scenario("800,000 unknown keys → `shrinkflow validate`", lambda: validate_with(
        ("\n".join(f"k{i}: 1" for i in range(800_000)) + "\n").encode()))
    # 4. the lock: `run --set` while `dvc repro` trains
    def race():
        repro = subprocess.Popen([str(BIN / "dvc"), "repro", "-f", "train_teacher"], cwd=ws, env=env(ws),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while "stage train_teacher" not in sh(ws, "ps", "-eo", "args").stdout:
                assert time.monotonic() < deadline, "dvc repro never started its stage"
                time.sleep(0.2)
            return cli(ws, "run", "--set", "train_teacher.epochs=250")
        finally:
            repro.wait(timeout=600)

    # The repro itself rewrites the teacher: only params.yaml is compared.
    scenario("`shrinkflow run --set` while `dvc repro` trains", race, watch=["params.yaml"])
    # 5. + 6. data the stage refuses (each through `shrinkflow run`)
    data = {
        "NaN in X": (np.array([[np.nan] * 4] * 40), np.arange(40) % 2),
        "NaN in y": (np.zeros((40, 4)), np.r_[np.zeros(39), np.nan]),
        "string labels, task auto": (np.zeros((40, 4)), np.array(["cat", "dog"] * 20)),
        "empty arrays": (np.zeros((0, 4)), np.zeros(0)),
        "one row": (np.zeros((1, 4)), np.zeros(1)),
        "lengths 40 vs 39": (np.zeros((40, 4)), np.zeros(39)),
    }
    for name, (X, y) in data.items():
        path = ws / f"bad-{len(rows)}.npz"
        np.savez(path, X=X, y=y)
        scenario(f"npz with {name} → `shrinkflow run`", lambda p=path: cli(ws, "run", "--set", "data.source=npz", "--set", f"data.path={p.name}"),
                 restore_params=True)
    # 7. a useless teacher
    scenario("teacher at lr 10 (chance accuracy) → `shrinkflow run`", lambda: cli(ws, "run", "--set", "train_teacher.optimizer.lr=10"),
             restore_params=True, expect_change=True)
    # 8. the smaller ones
    scenario("string-typed `.npy` → `shrinkflow predict`",
             lambda: cli(ws, "predict", "models/evaluate/student.sfz", "strings.npy"))
    mode = oct((ws / "params.yaml").stat().st_mode & 0o777)
    write_results(args.out, {"commit": head(), "rows": rows, "params_mode_after_runs": mode})
    print("\n| scenario | exit | message | tracebacks | code ran | nothing lost |\n|---|---|---|---|---|---|")
    for r in rows:
        lost = "n/a (meant to run)" if r["expect_change"] else ("yes" if not r["changed"] else "NO: " + ", ".join(r["changed"]))
        print(f"| {r['scenario']} | {r['exit']} | {r['message'].replace('|', '/')} | {r['tracebacks']} | {'YES' if r['marker'] else 'no'} | {lost} |")
    umask = os.umask(0)
    os.umask(umask)
    print(f"\nparams.yaml mode after `run --set` (umask {oct(umask)}): {mode}")


if __name__ == "__main__":
    main()
