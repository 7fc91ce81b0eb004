"""Static int8 on LeNet-5 in the runtimes a user deploys, alone and after 50 % structured pruning.

    .venv/bin/python bench/quantize_lenet.py --mnist ../shared/data/mnist [--lenet5-epochs 2] [--parts lenet5 lenet300]

1. LeNet-5 (Caffe variant): train an fp32 teacher, then through the methods' own
   entry points (what the stages call): ``static`` int8 (torch.export + pt2e,
   histogram observer, per-channel weights), and ``structured`` 50 % (one fine-tune
   epoch with the teacher's soft targets) followed by ``static``. Each variant is
   loaded back from its file; size and test accuracy come from that file. Latency
   at batch 1 and 256, teacher and variants interleaved in the same runtime
   (``shrinkflow.measure.latencies_ms``: fixed threads, warm-up, median):

   - ``compile``: ``torch.compile`` with frozen weights (``measure.compiled``), what
     ``evaluate.runtime: auto`` uses for static int8: the reported runtime;
   - ``onnxruntime``: the ONNX export (fp32 graph / int8 QDQ graph), CPU provider;
   - ``eager``: plain PyTorch, where the pt2e int8 graph runs reference kernels
     (shown to say why it is not the reported runtime).

   Speedups are within one runtime; the change of runtime (compiled vs eager fp32)
   is its own row.
2. LeNet-300-100: ``dynamic``, ``static`` and ``kmeans`` (4-bit, one epoch of centroid
   fine-tuning): size and test accuracy of each file.

Epochs are fixed in advance; the defaults are shorter than a full training run to fit
a shared 2-core CPU. Writes bench/results/quantize_lenet.json and prints markdown tables.
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
from schemas.prune import StructuredPrune  # noqa: E402
from schemas.quantize import DynamicQuant, KMeansQuant, StaticQuant  # noqa: E402
from shrinkflow.artifacts import ModelHeader, save_model  # noqa: E402
from shrinkflow.data import prepare  # noqa: E402
from shrinkflow.export import export_onnx, onnx_session  # noqa: E402
from shrinkflow.loading import load_model  # noqa: E402
from shrinkflow.measure import compiled, cpu_model, latencies_ms  # noqa: E402
from shrinkflow.methods import Env  # noqa: E402
from shrinkflow.pruning import PRUNERS  # noqa: E402
from shrinkflow.quantization import QUANTIZERS  # noqa: E402
from shrinkflow.training import fit, predict, seed_everything  # noqa: E402

BATCHES = [1, 256]


def accuracy_pct(run, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.cat([run(X[i : i + 1000]) for i in range(0, len(X), 1000)])
    return 100.0 * float((out.argmax(1) == y).float().mean())


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


def apply(method_table, src: Path, params, env: Env, dst: Path) -> tuple[Path, float]:
    """One method's entry point on the model in ``src``; the result saved to ``dst``."""
    model, header = load_model(src)
    t0 = time.time()
    out, h = method_table[params.method](model, header, params, env)
    save_model(out, dst, h)
    return dst, time.time() - t0


def ort_runner(path: Path, threads: int):
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def lenet5(args, splits, out: Path) -> dict:
    X, y = splits.tensors("test")
    fp32_path, secs = teacher({"arch": "lenet5"}, splits, args.lenet5_epochs, 0.02, args.seed, out, "lenet5")
    t_model, _ = load_model(fp32_path)
    env = Env(splits=splits, seed=args.seed, teacher=t_model)
    static = StaticQuant(calibration_batches=20, calibration_batch_size=128)
    ft = Finetune(epochs=1, batch_size=128, optimizer=Optimizer(lr=0.01), distill_from_teacher=True)
    files = {"fp32": fp32_path}
    timing = {}
    files["static-int8"], timing["static-int8"] = apply(QUANTIZERS, fp32_path, static, env, out / "lenet5-static.pt")
    pruned, timing["structured-50"] = apply(PRUNERS, fp32_path, StructuredPrune(method="structured", sparsity=0.5, finetune=ft), env,
                                            out / "lenet5-structured.pt")
    files["structured-50"] = pruned
    files["structured-50+static-int8"], timing["structured-50+static-int8"] = apply(QUANTIZERS, pruned, static, env,
                                                                                   out / "lenet5-structured-static.pt")
    models = {k: load_model(p)[0] for k, p in files.items()}
    onnx = {}
    for k, m in models.items():
        _, h = load_model(files[k])
        onnx[k] = export_onnx(m, h, out / f"{k}.onnx")
    runtimes = {
        "compile": {k: compiled(m) for k, m in models.items()},
        "onnxruntime": {k: ort_runner(Path(onnx[k]["path"]), args.threads) for k in models},
        "eager": dict(models),
    }
    rows = {k: {"size_bytes": os.path.getsize(p), "accuracy_pct": accuracy_pct(models[k], X, y),
                "accuracy_onnx_pct": accuracy_pct(runtimes["onnxruntime"][k], X, y), "onnx": onnx[k]["exported_as"],
                "method_seconds": timing.get(k)} for k, p in files.items()}
    lat = {}
    for rt, runners in runtimes.items():
        print(f"timing {rt} ...", flush=True)
        lat[rt] = latencies_ms(runners, X, BATCHES, threads=args.threads, min_run_time=args.min_run_time)
    speedup = {rt: {k: {b: lat[rt]["fp32"][b] / lat[rt][k][b] for b in BATCHES} for k in models} for rt in lat}
    return {"teacher_epochs": args.lenet5_epochs, "teacher_seconds": secs, "static": static.model_dump(mode="json"),
            "variants": rows, "latency_ms": lat, "speedup_vs_fp32_same_runtime": speedup,
            "runtime_change_fp32": {rt: {b: lat["eager"]["fp32"][b] / lat[rt]["fp32"][b] for b in BATCHES} for rt in lat}}


def lenet300(args, splits, out: Path) -> dict:
    X, y = splits.tensors("test")
    fp32_path, secs = teacher({"arch": "mlp", "hidden": [300, 100]}, splits, args.mlp_epochs, 0.05, args.seed, out, "lenet300")
    env = Env(splits=splits, seed=args.seed)
    methods = {
        "dynamic": DynamicQuant(),
        "static": StaticQuant(calibration_batches=20, calibration_batch_size=128),
        "kmeans-4bit": KMeansQuant(bits=4, finetune=Finetune(epochs=1, batch_size=128, optimizer=Optimizer(lr=0.01))),
    }
    files = {"fp32": fp32_path}
    for name, params in methods.items():
        files[name], _ = apply(QUANTIZERS, fp32_path, params, env, out / f"lenet300-{name}.pt")
    base = accuracy_pct(load_model(fp32_path)[0], X, y)
    table = {}
    for name, path in files.items():
        acc = accuracy_pct(load_model(path)[0], X, y)
        table[name] = {"size_bytes": os.path.getsize(path), "ratio": os.path.getsize(fp32_path) / os.path.getsize(path),
                       "accuracy_pct": acc, "accuracy_drop_pp": base - acc}
    return {"teacher_epochs": args.mlp_epochs, "teacher_seconds": secs, "variants": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the four MNIST IDX .gz files")
    ap.add_argument("--parts", nargs="+", default=["lenet5", "lenet300"])
    ap.add_argument("--lenet5-epochs", type=int, default=2)
    ap.add_argument("--mlp-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads for training and latency")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images only (smoke runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize_lenet.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = prepare(MnistData(source="mnist", path=str(args.mnist.resolve()), train_limit=args.train_limit), seed=args.seed, root=Path("/"))
    result: dict = {
        "host": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                 "load_average_before": os.getloadavg()[0]},
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("mnist", "out")},  # no local paths
        "data": {"train": len(splits.X_train), "val": len(splits.X_val), "test": len(splits.X_test)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if "lenet5" in args.parts:
            r = result["lenet5"] = lenet5(args, splits, out)
            print(f"\n## LeNet-5: static int8 and structured 50 % + static int8 ({args.threads} thread(s), {cpu_model()}, "
                  f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f})\n")
            print("| variant | file bytes | test acc % (torch / onnxruntime) | runtime | b1 ms | b256 ms | speedup b1 | speedup b256 |")
            print("|---|---|---|---|---|---|---|---|")
            for rt in ("compile", "onnxruntime", "eager"):
                for k, v in r["variants"].items():
                    lat, sp = r["latency_ms"][rt][k], r["speedup_vs_fp32_same_runtime"][rt][k]
                    print(f"| {k} | {v['size_bytes']:,} | {v['accuracy_pct']:.2f} / {v['accuracy_onnx_pct']:.2f} | {rt} | "
                          f"{lat[1]:.3f} | {lat[256]:.2f} | {sp[1]:.2f}× | {sp[256]:.2f}× |")
            ch = r["runtime_change_fp32"]
            print(f"\nruntime change, fp32 teacher vs eager: compile {ch['compile'][1]:.2f}× (b1) / {ch['compile'][256]:.2f}× "
                  f"(b256); onnxruntime {ch['onnxruntime'][1]:.2f}× / {ch['onnxruntime'][256]:.2f}×", flush=True)
        if "lenet300" in args.parts:
            r = result["lenet300"] = lenet300(args, splits, out)
            print("\n## LeNet-300-100: quantization methods (sizes of the saved files)\n")
            print("| variant | size (bytes) | vs fp32 | test acc (%) | drop (pp) |\n|---|---|---|---|---|")
            for name, v in r["variants"].items():
                print(f"| {name} | {v['size_bytes']:,} | {v['ratio']:.2f}x | {v['accuracy_pct']:.2f} | {v['accuracy_drop_pp']:.2f} |")
    result["host"]["load_average_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
