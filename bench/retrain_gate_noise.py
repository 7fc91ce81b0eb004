"""How often do the retrain gates reject a model that did not change? Plain vs paired.

Builds a throwaway clone of this repository's HEAD (digits, the default params), runs
the retrain flow once (seed 0 → production), then runs it again for seeds 1..N of the
*same* configuration with ``promote=false`` (each candidate is gated, then the
workspace is restored), both gates on:

- plain: ``max_regression: 0`` (any loss of accuracy vs production rejects);
- paired: ``significance`` (McNemar's exact test on the same test examples).

With ``--source fixed-test`` (default) the data is digits as an .npz with a fixed test
set of 360 examples (``X_test``/``y_test``), so the seed changes the train/val split
and the initialisation only, and every candidate is compared on the same 360 digits.
With ``--source digits`` the seed also re-draws the test split; the comparison then
leaves out the examples production trained or validated on (fewer examples).

Prints a table and writes bench/results/retrain_gate_noise.json.

    .venv/bin/python bench/retrain_gate_noise.py [--seeds 10] [--significance 0.05] [--source fixed-test]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from presets import ROOT, clone, env, host, write_results

TEST_SIZE = 360


def make_project(dest: Path, source: str) -> Path:
    """A clone of this repository's HEAD; with ``fixed-test``, digits as an .npz with a fixed test set."""
    import numpy as np
    from sklearn.datasets import load_digits

    from shrinkflow.config import apply_to_params_file

    clone(dest, None)
    # the clone's origin is this working copy: a retrain run would push its candidates there
    subprocess.run(["git", "remote", "remove", "origin"], cwd=dest, env=env(), check=True)
    if source == "fixed-test":
        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.target))
        X = (d.data.astype(np.float32)[order] / 16.0).reshape(-1, 1, 8, 8)
        y = d.target.astype(np.int64)[order]
        np.savez(dest / "data/raw/digits.npz", X=X[TEST_SIZE:], y=y[TEST_SIZE:], X_test=X[:TEST_SIZE], y_test=y[:TEST_SIZE])
        apply_to_params_file(dest / "params.yaml", overrides=["data.source=npz", "data.path=data/raw"])
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "digits with a fixed test set"]):
            subprocess.run(cmd, cwd=dest, env=env(), check=True, capture_output=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="Candidates: seeds 1..N of the production config (seed 0).")
    ap.add_argument("--significance", type=float, default=0.05, help="Level of the paired gate.")
    ap.add_argument("--source", choices=["fixed-test", "digits"], default="fixed-test")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/retrain_gate_noise.json")
    args = ap.parse_args()
    os.environ.update(env())
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts it slowly
    measured_on = host()

    from flows.retrain import result_of, retrain

    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")  # a throwaway ephemeral server
        root = make_project(Path(tmp) / "proj", args.source)
        os.environ["PYTHONPATH"] = str(root)  # stage commands import the clone's code, not the editable install's tree
        print("seed 0 → production ...", flush=True)
        first = retrain(root=str(root), return_state=True)
        assert first.name == "Promoted", first.message
        prod_metrics = first.result().gates
        for seed in range(1, args.seeds + 1):
            state = retrain(root=str(root), overrides=[f"seed={seed}"], significance=args.significance, max_regression=0.0,
                            promote=False, return_state=True)
            r = result_of(state)
            gates = {g.name: g for g in r.gates}
            c = r.comparison
            row = {
                "seed": seed, "state": state.name, "n": c.n, "production": c.production, "candidate": c.candidate,
                "difference_pp": 100 * c.difference, "interval_pp": [100 * c.low, 100 * c.high], "p_value": c.p_value,
                "wins": c.wins, "losses": c.losses,
                "plain_rejects": not gates["no_regression_vs_prod"].passed,
                "paired_rejects": not gates["no_significant_regression_vs_prod"].passed,
                "evaluate_gates_failed": [g.name for g in r.gates if not g.passed and not g.name.endswith("_vs_prod")],
            }
            rows.append(row)
            print(f"  seed {seed}: {c.describe()}; plain {'REJECTS' if row['plain_rejects'] else 'passes'}, "
                  f"paired {'REJECTS' if row['paired_rejects'] else 'passes'}", flush=True)

    plain, paired = sum(r["plain_rejects"] for r in rows), sum(r["paired_rejects"] for r in rows)
    result = {"host": measured_on, "command": " ".join(["python bench/retrain_gate_noise.py", *sys.argv[1:]]), "source": args.source, "significance": args.significance, "production": "seed 0",
              "production_gates": [g.model_dump() for g in prod_metrics], "candidates": rows,
              "plain_rejects": plain, "paired_rejects": paired, "seconds": time.time() - t_start}
    write_results(args.out, result)
    print()
    print(f"host: {measured_on['cpu']}, {measured_on['cpus']} CPUs, torch {measured_on['torch']}; data: {args.source}; production: seed 0")
    print("| seed | n | acc prod | acc cand | diff (pp) | interval (pp) | p | plain (max_regression 0) | paired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['n']} | {100 * r['production']:.2f} | {100 * r['candidate']:.2f} | {r['difference_pp']:+.2f} | "
              f"[{r['interval_pp'][0]:+.2f}, {r['interval_pp'][1]:+.2f}] | {r['p_value']:.3g} | "
              f"{'reject' if r['plain_rejects'] else 'pass'} | {'reject' if r['paired_rejects'] else 'pass'} |")
    print(f"\nplain gate rejects {plain}/{len(rows)} seeds of the unchanged model; paired gate (alpha {args.significance:g}) "
          f"rejects {paired}/{len(rows)}. Raw: {args.out}")


if __name__ == "__main__":
    main()
