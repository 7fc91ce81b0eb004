"""Quantization on MNIST: LeNet-5 static int8 vs fp32, and LeNet-300-100 dynamic vs static vs kmeans-4bit.

    .venv/bin/python bench/quantize_lenet.py --mnist ../shared/data/mnist [--lenet5-epochs 2 --mlp-epochs 5]

1. LeNet-5 (Caffe variant): train an fp32 teacher, quantize it with ``static``
   (FX int8, histogram observer, per-channel weights), and report, each from its
   file on disk: size ratio, test accuracy drop, and latency at batch 1 and 256
   (eager PyTorch for both, ``shrinkflow.measure.latencies_ms``: fixed threads,
   warm-up, variants interleaved, median).
2. LeNet-300-100: train an fp32 teacher; ``dynamic``, ``static`` and ``kmeans``
   (4-bit, 1 epoch of centroid fine-tuning): size and test accuracy of each file.

Epochs are fixed in advance (no choice by the test split); the defaults are
smaller than a full training run to fit a shared 2-core CPU: accuracy is then
below the published LeNet figures, but fp32 and quantized variants come from the
same teacher, so the *drops* are what to read. Writes
bench/results/quantize_lenet.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.common import Finetune, Optimizer  # noqa: E402
from schemas.data import MnistData  # noqa: E402
from schemas.quantize import DynamicQuant, KMeansQuant, StaticQuant  # noqa: E402
from shrinkflow.artifacts import ModelHeader, load_model, save_model  # noqa: E402
from shrinkflow.data import prepare  # noqa: E402
from shrinkflow.measure import (
    cpu_model,  # noqa: E402
    latencies_ms,  # noqa: E402
)
from shrinkflow.quantization import QUANTIZERS, QuantEnv  # noqa: E402
from shrinkflow.training import fit, predict, seed_everything  # noqa: E402


def accuracy_pct(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((predict(model, X).argmax(1) == y).float().mean())


def teacher(spec: dict, splits, epochs: int, lr: float, seed: int, out: Path, name: str) -> tuple[Path, float]:
    seed_everything(seed)
    header = ModelHeader(spec=spec, input_shape=splits.input_shape, out_features=splits.out_features, task=splits.task)
    model = header.build()
    t0 = time.time()
    fit(model, splits, epochs=epochs, batch_size=128, optimizer=Optimizer(name="sgd", lr=lr, momentum=0.9),
        seed=seed, device=torch.device("cpu"), where=f"{name}.teacher")
    path = out / f"{name}-fp32.pt"
    save_model(model, path, header)
    return path, time.time() - t0


def quantize_file(src: Path, params, splits, seed: int, dst: Path) -> tuple[Path, float]:
    model, header = load_model(src)
    env = QuantEnv(splits=splits, header=header, seed=seed)
    t0 = time.time()
    qmodel, entry = QUANTIZERS[params.method](model, params, env)
    save_model(qmodel, dst, header.with_transform(entry.pop("kind"), **entry))
    return dst, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--lenet5-epochs", type=int, default=2)
    ap.add_argument("--mlp-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and latency")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images only (smoke runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize_lenet.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = prepare(MnistData(source="mnist", path=str(args.mnist.resolve()), train_limit=args.train_limit), seed=args.seed, root=Path("/"))
    X, y = splits.tensors("test")
    result: dict = {
        "host": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("mnist", "out")},  # no local paths
        "data": {"train": len(splits.X_train), "val": len(splits.X_val), "test": len(X)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # ---- 1. LeNet-5 static int8 vs fp32
        fp32_path, secs = teacher({"arch": "lenet5"}, splits, args.lenet5_epochs, 0.02, args.seed, out, "lenet5")
        static = StaticQuant(calibration_batches=20, calibration_batch_size=128)
        q_path, qsecs = quantize_file(fp32_path, static, splits, args.seed, out / "lenet5-static.pt")
        fp32, _ = load_model(fp32_path)
        q, _ = load_model(q_path)
        lat = latencies_ms({"fp32": fp32, "static-int8": q}, X, [1, 256], threads=args.threads,
                           min_run_time=args.min_run_time)
        acc_f, acc_q = accuracy_pct(fp32, X, y), accuracy_pct(q, X, y)
        size_f, size_q = os.path.getsize(fp32_path), os.path.getsize(q_path)
        result["lenet5"] = {
            "teacher_epochs": args.lenet5_epochs, "teacher_seconds": secs, "quantize_seconds": qsecs,
            "static": static.model_dump(mode="json"),
            "fp32": {"size_bytes": size_f, "accuracy_pct": acc_f, "latency_ms": lat["fp32"]},
            "static-int8": {"size_bytes": size_q, "accuracy_pct": acc_q, "latency_ms": lat["static-int8"]},
            "size_ratio": size_f / size_q,
            "accuracy_drop_pp": acc_f - acc_q,
            "speedup": {b: lat["fp32"][b] / lat["static-int8"][b] for b in (1, 256)},
        }
        print("\n## LeNet-5: static int8 vs fp32 (eager PyTorch, "
              f"{args.threads} thread(s), {cpu_model()}, torch {torch.__version__})\n")
        print("| variant | size (bytes) | test acc (%) | b1 (ms) | b256 (ms) |\n|---|---|---|---|---|")
        for name in ("fp32", "static-int8"):
            r = result["lenet5"][name]
            print(f"| {name} | {r['size_bytes']:,} | {r['accuracy_pct']:.2f} | {r['latency_ms'][1]:.3f} | {r['latency_ms'][256]:.2f} |")
        r = result["lenet5"]
        print(f"\nsize ratio {r['size_ratio']:.2f}x, accuracy drop {r['accuracy_drop_pp']:.2f} pp, "
              f"speedup b1 {r['speedup'][1]:.2f}x, b256 {r['speedup'][256]:.2f}x", flush=True)

        # ---- 2. LeNet-300-100: dynamic vs static vs kmeans-4bit
        fp32_path, secs = teacher({"arch": "mlp", "hidden": [300, 100]}, splits, args.mlp_epochs, 0.05, args.seed, out,
                                  "lenet300")
        rows = {"fp32": fp32_path}
        methods = {
            "dynamic": DynamicQuant(),
            "static": StaticQuant(calibration_batches=20, calibration_batch_size=128),
            "kmeans-4bit": KMeansQuant(bits=4, finetune=Finetune(epochs=1, batch_size=128, optimizer=Optimizer(lr=0.01))),
        }
        timing = {}
        for name, params in methods.items():
            rows[name], timing[name] = quantize_file(fp32_path, params, splits, args.seed, out / f"lenet300-{name}.pt")
        base_size = os.path.getsize(fp32_path)
        base_acc = accuracy_pct(load_model(fp32_path)[0], X, y)
        table = {}
        for name, path in rows.items():
            acc = accuracy_pct(load_model(path)[0], X, y)
            size = os.path.getsize(path)
            table[name] = {"size_bytes": size, "ratio": base_size / size, "accuracy_pct": acc,
                           "accuracy_drop_pp": base_acc - acc, "quantize_seconds": timing.get(name)}
        result["lenet300"] = {"teacher_epochs": args.mlp_epochs, "teacher_seconds": secs, "variants": table}
        print("\n## LeNet-300-100: quantization methods (sizes of the saved files)\n")
        print("| variant | size (bytes) | vs fp32 | test acc (%) | drop (pp) |\n|---|---|---|---|---|")
        for name, r in table.items():
            print(f"| {name} | {r['size_bytes']:,} | {r['ratio']:.2f}x | {r['accuracy_pct']:.2f} | {r['accuracy_drop_pp']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
