"""FP32 vs INT8 (PTQ for two targets, QAT): accuracy, file size and ONNX Runtime CPU latency, side by side.

For each model: train it (seeded) into a float bundle, export that with ``export_bundle`` (FP32 ONNX),
quantize the float bundle three ways with ``quantize_bundle`` and export each INT8 bundle's QDQ graph:

* ``int8-ptq-cpu``: PTQ, target ``cpu`` (U8S8: uint8 asymmetric activations, int8 per-channel weights,
  which ONNX Runtime runs with integer kernels on x86);
* ``int8-ptq-tensorrt``: PTQ, target ``tensorrt`` (S8S8, zero points 0: TensorRT's explicit
  quantization).  Built for TensorRT, not for ONNX Runtime on a CPU: it is not expected to be faster there;
* ``int8-qat-tensorrt``: QAT fine-tuning with fake quantization, target ``tensorrt``.

All four ``.onnx`` files are scored on the same test split with ``evaluate_artifact`` and timed in one
``bench_artifacts`` call per model (alternating blocks of calls, FP32 first, so the speed-ups are ratios
measured side by side; see edgeguard/evaluate/bench.py).  Prints one Markdown table and writes a JSON file.

    python benchmarks/bench_quantize.py
    python benchmarks/bench_quantize.py --models smallcnn --iterations 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes  # noqa: E402  (a script in this folder: machine info and the busy-machine check)

from edgeguard.config import DataConfig  # noqa: E402
from edgeguard.training import TrainConfig  # noqa: E402

BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class QuantCase:
    arch: str
    train_data: DataConfig
    test_data: DataConfig
    train: TrainConfig
    qat_epochs: int
    note: str


CASES = {
    "smallcnn": QuantCase(
        "smallcnn",
        DataConfig("digits"),
        DataConfig("digits"),  # the fixed 540-image test split
        TrainConfig(epochs=10, lr=0.05, seed=0),
        qat_epochs=2,
        note="digits: 1,257 train / 540 test real 8x8 digits upsampled to 1x32x32",
    ),
    "resnet18": QuantCase(
        "resnet18",
        DataConfig("synthetic", options={"n": 2000}),
        DataConfig("synthetic", options={"n": 500}),  # the generator's held-out test split (its own seed)
        TrainConfig(epochs=3, lr=0.05, batch_size=64, seed=0),
        qat_epochs=1,
        note="synthetic: 2,000 train / 500 test procedural 3x32x32 gratings, 10 classes",
    ),
}
VARIANTS = ("fp32", "int8-ptq-cpu", "int8-ptq-tensorrt", "int8-qat-tensorrt")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quantize.json"
TARGET_NOTE = (
    "The `cpu` target is U8S8 (uint8 activations, int8 weights): the layout ONNX Runtime's x86 integer "
    "kernels are fast with. The `tensorrt` target is S8S8 with zero points 0, for TensorRT's explicit "
    "quantization; it is NOT expected to be faster than FP32 on ONNX Runtime's CPU provider."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models", type=bench_runtimes.name_list(CASES), default=list(CASES), help="comma-separated (default smallcnn,resnet18)"
    )
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per artifact and batch size (default 3)"
    )
    p.add_argument(
        "--iterations", type=int, default=20, help="timed calls per artifact and batch size (default 20)"
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=512,
        help="training images that calibrate the PTQ observers (default 512)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON results (default benchmarks/results/quantize.json)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the bundles and .onnx files here (default: a temp dir, removed)",
    )
    p.add_argument("--verbose", action="store_true", help="show edgeguard progress on stderr")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iterations < 1 or args.calib_samples < 1:
        p.error("--warmup must be >= 0, --iterations and --calib-samples >= 1")
    return args


def _say(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def _timed(fn, *a, **kw) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - t0, 2)


def prepare(name: str, workdir: Path, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any]]:
    """Train, export, quantize three ways and export again; return {variant: .onnx path} and facts."""
    from edgeguard.api import export_bundle, train_bundle
    from edgeguard.config import ModelConfig
    from edgeguard.quantize.core import PtqConfig, QatConfig, quantize_bundle

    case = CASES[name]
    _say(name, f"train {case.arch} on {case.train_data.name} ({case.train.epochs} epochs) ...")
    float_bundle = workdir / f"{name}.fp32.bundle"
    trained, train_s = _timed(train_bundle, case.train_data, ModelConfig(case.arch), case.train, float_bundle)
    fit = {k: v for k, v in trained.fit.to_json().items() if k != "history"}
    facts: dict[str, Any] = {
        "model": name,
        "arch": case.arch,
        "params": trained.parameters,
        "data": case.note,
        "train_data": case.train_data.to_dict(),
        "test_data": case.test_data.to_dict(),
        "train_config": case.train.to_dict(),
        "train_seconds": train_s,
        "fit": {**fit, "final": trained.fit.history[-1] if trained.fit.history else {}},
        "qat_epochs": case.qat_epochs,
        "variants": {},
    }
    ptq = {t: PtqConfig(target=t, calib_samples=args.calib_samples) for t in ("cpu", "tensorrt")}
    qcfgs = {
        "int8-ptq-cpu": ptq["cpu"],
        "int8-ptq-tensorrt": ptq["tensorrt"],
        "int8-qat-tensorrt": QatConfig(base=ptq["tensorrt"], epochs=case.qat_epochs),
    }
    bundles = {"fp32": float_bundle}
    steps: dict[str, dict[str, Any]] = {"fp32": {"bundle_sha256": trained.sha256}}
    for variant, qcfg in qcfgs.items():
        _say(name, f"quantize: {variant} ...")
        q, q_s = _timed(quantize_bundle, float_bundle, workdir / f"{name}.{variant}.bundle", qcfg)
        bundles[variant] = Path(q.bundle)
        steps[variant] = {
            "quantize_seconds": q_s,
            "qdq_nodes": q.qdq_nodes,
            "bundle_sha256": q.sha256,
            "config": qcfg.to_dict(),
        }
    paths: dict[str, Path] = {}
    for variant in VARIANTS:
        exp, exp_s = _timed(export_bundle, bundles[variant], workdir / f"{name}.{variant}.onnx")
        paths[variant] = Path(exp.path)
        steps[variant].update(
            onnx_bytes=exp.bytes,
            onnx_sha256=exp.sha256,
            opset=exp.opset,
            export_seconds=exp_s,
            self_check_max_abs_diff=exp.self_check_max_abs_diff,  # FP32 only: INT8 ships its stored QDQ graph
            self_check_top1_agreement=exp.self_check_top1_agreement,
        )
        if args.workdir:
            steps[variant].update(bundle=str(bundles[variant]), onnx=str(paths[variant]))
    facts["variants"] = steps
    return paths, facts


def measure(
    name: str, paths: dict[str, Path], args: argparse.Namespace
) -> tuple[list[dict], list[dict], dict]:
    """Accuracy of every variant on the test split, then one side-by-side latency run of all four."""
    from edgeguard.api import bench_artifacts, evaluate_artifact
    from edgeguard.evaluate import BenchConfig

    case = CASES[name]
    _say(name, f"accuracy on the {case.test_data.name} test split ...")
    acc: dict[str, Any] = {}
    for variant in VARIANTS:
        acc[variant] = evaluate_artifact(paths[variant], case.test_data)
    _say(name, f"benchmark the 4 .onnx files in ONNX Runtime (CPU) at batch {list(BATCH_SIZES)} ...")
    cfg = BenchConfig(batch_sizes=BATCH_SIZES, warmup=args.warmup, iterations=args.iterations)
    cpu_before = bench_runtimes._cpu_seconds()
    res, bench_s = _timed(
        bench_artifacts, [paths[v] for v in VARIANTS], cfg, names=[f"{name}/{v}" for v in VARIANTS]
    )
    bench_busy = bench_runtimes.contention(cpu_before, bench_runtimes._cpu_seconds(), bench_s)
    bench_rows = [r.__dict__ for r in res.rows]
    fp32_bytes = paths["fp32"].stat().st_size
    rows = []
    for variant in VARIANTS:
        a = acc[variant]
        size = paths[variant].stat().st_size
        row: dict[str, Any] = {
            "model": name,
            "variant": variant,
            "accuracy": a.accuracy,
            "correct": a.correct,
            "n": a.n,
            "delta_accuracy_points": round(100.0 * (a.accuracy - acc["fp32"].accuracy), 2),
            "onnx_bytes": size,
            "size_mb": round(size / 1e6, 3),
            "size_ratio": round(size / fp32_bytes, 4),
        }
        for r in bench_rows:
            if r["artifact"] == f"{name}/{variant}":
                b = r["batch"]
                row.update(
                    {
                        "precision": r["precision"],
                        f"p50_ms_b{b}": r["p50_ms"],
                        f"p90_ms_b{b}": r["p90_ms"],
                        f"img_s_b{b}": r["throughput"],
                        f"speedup_b{b}": r["ratio_p50"],  # FP32 p50 / this p50, from bench_runners
                    }
                )
        rows.append(row)
    return (
        rows,
        bench_rows,
        {
            "bench_seconds": bench_s,
            # what other processes used while the latencies were measured (the whole run: machine.during_run)
            "bench_during": bench_busy,
            "test_split": acc["fp32"].split,
            "test_n": acc["fp32"].n,
        },
    )


def table(rows: list[dict]) -> str:
    b1, b2 = BATCH_SIZES
    head = (
        f"| model | variant | accuracy | Δ acc (pts) | size MB | size vs FP32 | p50 ms b{b1} | speed-up b{b1} "
        f"| p50 ms b{b2} | speed-up b{b2} |"
    )
    lines = [head, "|---|---|" + "---:|" * 8]
    for r in rows:
        delta = "–" if r["variant"] == "fp32" else f"{r['delta_accuracy_points']:+.2f}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {100 * r['accuracy']:.2f}% | {delta} | {r['size_mb']:.2f} "
            f"| {r['size_ratio']:.2f}x | {r[f'p50_ms_b{b1}']:.3f} | {r[f'speedup_b{b1}']:.2f}x "
            f"| {r[f'p50_ms_b{b2}']:.3f} | {r[f'speedup_b{b2}']:.2f}x |"
        )
    return "\n".join(lines)


def _warning(models: list[dict]) -> str | None:
    """Contention matters for the latencies: check each model's benchmark phase, not training."""
    warnings = []
    for m in models:
        w = bench_runtimes.busy_warning(m["bench_during"])
        if w:
            warnings.append(f"{m['model']} latency measurement: {w}")
    return "\n".join(warnings) or None


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    cpu_before = bench_runtimes._cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-quant-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models, rows, raw = [], [], []
        for name in args.models:
            t0 = time.perf_counter()
            paths, facts = prepare(name, workdir, args)
            model_rows, bench_rows, bench_facts = measure(name, paths, args)
            facts.update(bench_facts, total_seconds=round(time.perf_counter() - t0, 1))
            models.append(facts)
            rows.extend(model_rows)
            raw.extend({**r, "iterations": args.iterations, "warmup": args.warmup} for r in bench_rows)
    wall = time.perf_counter() - t_start
    busy = bench_runtimes.contention(cpu_before, bench_runtimes._cpu_seconds(), wall)
    return {
        "note": TARGET_NOTE,
        "machine": {**bench_runtimes.machine(), "during_run": busy},
        "warning": _warning(models),
        "config": {
            "models": args.models,
            "variants": list(VARIANTS),
            "batch_sizes": list(BATCH_SIZES),
            "warmup": args.warmup,
            "iterations": args.iterations,
            "calib_samples": args.calib_samples,
            "calibration": "histogram",
            "timing": "bench_artifacts: alternating blocks of consecutive calls per artifact (re-warmed after each "
            "switch), FP32 first; Runner.predict wall time in ONNX Runtime, CPUExecutionProvider",
            "accuracy": "evaluate_artifact on each .onnx file, same test split for all variants",
        },
        "models": models,
        "rows": rows,
        "bench_rows": raw,
        "total_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["EDGEGUARD_QUIET"] = "0" if args.verbose else "1"
    result = run(args)
    mach = result["machine"]
    print(
        f"Trained models, FP32 vs INT8 ONNX in ONNX Runtime (CPU). {mach['processor']}, {mach['cpus']} CPUs, "
        f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}."
    )
    print(
        f"Timed calls per artifact and batch: {args.iterations}, after {args.warmup} warm-up calls; the four "
        "artifacts of a model timed in alternating blocks. Speed-up = FP32 p50 / variant p50 (>1: faster); "
        "size vs FP32 = variant bytes / FP32 bytes; Δ acc in percentage points vs FP32.\n"
    )
    print(table(result["rows"]))
    print()
    print("Note: " + TARGET_NOTE + "\n")
    if result["warning"]:
        print(result["warning"] + "\n")
    whole = mach["during_run"]
    if bench_runtimes.busy_warning(whole):
        print(
            f"Other processes kept {whole['other_processes_cores']:.2f} cores busy over the whole run (steal "
            f"{whole['steal_cores']:.2f}): training and quantization times are inflated; the latency phases "
            "are checked on their own above and per model below.\n"
        )
    for m in result["models"]:
        v = m["variants"]
        quant = ", ".join(f"{k} {v[k]['quantize_seconds']:.0f}s" for k in VARIANTS[1:])
        print(
            f"{m['model']} ({m['params']:,} params; {m['data']}; test n={m['test_n']}): train "
            f"{m['train_seconds']:.0f}s, quantize {quant}, bench {m['bench_seconds']:.0f}s (other processes "
            f"{m['bench_during'].get('other_processes_cores', float('nan')):.2f} cores meanwhile); "
            f"FP32 export self-check max |Δprob| {v['fp32']['self_check_max_abs_diff']:.1e}"
        )
    from edgeguard.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\ntotal {result['total_seconds']:.1f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
