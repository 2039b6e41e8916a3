"""A user's ResNet-50 (23.5 M parameters, plain PyTorch, outside the registry) imported and quantized with PTQ:
INT8 vs FP32 latency on ONNX Runtime CPU at batch 1 and 64, and the fused heuristic head's overhead on both, as
ratios measured side by side in one run.

The model is ``benchmarks/byom_resnet50.py:resnet50`` (torchvision's ResNet-50 layout).  It is trained here the way a
user would elsewhere -- ``--train-epochs`` epochs on the synthetic gratings at ``--size`` pixels, inputs normalised
outside the model with ImageNet's mean/std -- its state dict saved, then it goes through the commands' library
calls: ``import_model`` (factory + state dict + mean/std) -> ``quantize_bundle`` (PTQ, target ``cpu``: U8S8) ->
``export_bundle`` four times (FP32, FP32 + heuristic, INT8, INT8 + heuristic) -> accuracy of each ``.onnx`` on the
test split -> one ``bench_artifacts`` call over the four files (alternating blocks, FP32 first).

    python benchmarks/bench_import.py                   # about 6 minutes on 2 CPU cores
    python benchmarks/bench_import.py --quick           # a smoke run: 32x32, no training, few calls
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes  # noqa: E402  (a script in this folder: machine info and the busy-machine check)

BATCH_SIZES = (1, 64)
FACTORY = Path(__file__).resolve().parent / "byom_resnet50.py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VARIANTS = ("fp32", "fp32+heuristic", "int8", "int8+heuristic")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "import.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--train-epochs", type=int, default=2, help="user training epochs before import (default 2; 0: random init)")
    p.add_argument("--train-n", type=int, default=2000, help="synthetic training images (default 2000)")
    p.add_argument("--test-n", type=int, default=500, help="synthetic test images (default 500)")
    p.add_argument("--calib-samples", type=int, default=256, help="PTQ calibration images (default 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per artifact and batch size (default 2)")
    p.add_argument("--iterations", type=int, default=30, help="timed calls per artifact at batch 64 (default 30)")
    p.add_argument("--iterations-b1", type=int, default=300,
                   help="timed calls per artifact at batch 1 (default 300: its latency is bimodal on small CPUs)")
    p.add_argument("--quick", action="store_true", help="32x32, no training, 64 calibration images, 3 timed calls")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results/import.json)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the bundles and .onnx files here (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="show edgeguard progress on stderr")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.train_epochs, args.calib_samples, args.iterations, args.warmup = 32, 0, 64, 3, 1
        args.iterations_b1 = 10
        args.train_n, args.test_n = 256, 128
    if args.size < 32 or args.train_epochs < 0 or min(args.iterations, args.iterations_b1) < 1 or args.warmup < 0 \
            or args.calib_samples < 2:
        p.error("--size must be >= 32, --train-epochs and --warmup >= 0, --iterations >= 1, --calib-samples >= 2")
    return args


def _say(msg: str) -> None:
    print(f"[import] {msg}", file=sys.stderr, flush=True)


def _timed(fn, *a, **kw) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - t0, 2)


def user_weights(args: argparse.Namespace, data_cfg, path: Path) -> dict[str, Any]:
    """What the user did elsewhere: build the network, train it with normalisation outside, save a state dict."""
    import byom_resnet50
    import torch
    from torch import nn

    from edgeguard.data import load_data
    from edgeguard.models import Normalize
    from edgeguard.training import TrainConfig, fit

    torch.manual_seed(0)
    net = byom_resnet50.resnet50(num_classes=10)
    facts: dict[str, Any] = {"train_epochs": args.train_epochs}
    if args.train_epochs:
        data = load_data(data_cfg, "train")
        _say(f"user training: {args.train_epochs} epoch(s) on {len(data)} synthetic {args.size}x{args.size} images ...")
        fit_res, facts["train_seconds"] = _timed(
            fit, nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net), data,
            TrainConfig(epochs=args.train_epochs, optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64, seed=0),
            desc="user training", quiet=not args.verbose,
        )
        facts["final"] = fit_res.history[-1] if fit_res.history else {}
    torch.save(net.eval().state_dict(), path)
    facts["weights_bytes"] = path.stat().st_size
    return facts


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    from edgeguard.api import export_bundle
    from edgeguard.config import DataConfig
    from edgeguard.importing import import_model
    from edgeguard.quantize import PtqConfig, quantize_bundle

    data_cfg = DataConfig("synthetic", options={"size": args.size, "n": args.train_n})
    facts: dict[str, Any] = {"user": user_weights(args, data_cfg, workdir / "resnet50.pt")}
    _say("import ...")
    imp, facts["import_seconds"] = _timed(
        import_model, f"{FACTORY}:resnet50", out=workdir / "imported", weights=workdir / "resnet50.pt",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, data=data_cfg,
    )
    facts["import"] = {k: v for k, v in imp.to_json().items() if k != "classes"}
    qcfg = PtqConfig(target="cpu", calib_samples=args.calib_samples)
    _say(f"PTQ (target cpu, {args.calib_samples} calibration images) ...")
    q, facts["quantize_seconds"] = _timed(quantize_bundle, imp.bundle, workdir / "int8", qcfg)
    facts["quantize"] = {"qdq_nodes": q.qdq_nodes, "config": qcfg.to_dict()}
    sources = {"fp32": imp.bundle, "int8": q.bundle}
    paths: dict[str, Path] = {}
    facts["exports"] = {}
    for variant in VARIANTS:
        precision, _, defense = variant.partition("+")
        _say(f"export {variant} ...")
        exp, secs = _timed(export_bundle, sources[precision], workdir / f"{variant.replace('+', '_')}.onnx",
                           defense=defense or "none")
        paths[variant] = Path(exp.path)
        facts["exports"][variant] = {"bytes": exp.bytes, "sha256": exp.sha256, "seconds": secs,
                                     "head_check_max_abs_diff": getattr(exp, "head_check_max_abs_diff", None)}
    return paths, facts


def measure(args: argparse.Namespace, paths: dict[str, Path]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    import numpy as np

    from edgeguard.api import bench_artifacts
    from edgeguard.config import DataConfig
    from edgeguard.data import load_data
    from edgeguard.evaluate import BenchConfig, predict_dataset
    from edgeguard.runtime import open_runner

    test = load_data(DataConfig("synthetic", options={"size": args.size, "n": args.test_n}), "test")
    _say(f"accuracy of the 4 files on {len(test)} test images ...")
    probs: dict[str, np.ndarray] = {}
    for v in VARIANTS:
        with open_runner(paths[v]) as r:
            probs[v], labels = predict_dataset(r, test)
    _say(f"benchmark the 4 .onnx files in ONNX Runtime (CPU) at batch {list(BATCH_SIZES)} ...")
    cpu_before = bench_runtimes._cpu_seconds()
    t0 = time.perf_counter()
    rows_all = []
    for b in BATCH_SIZES:  # one side-by-side run per batch size (batch 1 gets more calls: it is bimodal)
        cfg = BenchConfig(batch_sizes=(b,), warmup=args.warmup, iterations=args.iterations_b1 if b == 1 else args.iterations)
        rows_all += bench_artifacts([paths[v] for v in VARIANTS], cfg, names=list(VARIANTS)).rows
    bench_s = round(time.perf_counter() - t0, 2)
    during = bench_runtimes.contention(cpu_before, bench_runtimes._cpu_seconds(), bench_s)
    p50 = {(r.artifact, r.batch): r.p50_ms for r in rows_all}
    mean = {(r.artifact, r.batch): r.mean_ms for r in rows_all}
    rows = []
    for v in VARIANTS:
        precision, _, defense = v.partition("+")
        top1 = probs[v].argmax(1)
        row: dict[str, Any] = {
            "variant": v,
            "accuracy": float((top1 == labels).mean()),
            "top1_agreement_vs_fp32": float((top1 == probs["fp32"].argmax(1)).mean()),
            "max_abs_dprob_vs_fp32": float(np.abs(probs[v] - probs["fp32"]).max()),
            "size_mb": round(paths[v].stat().st_size / 1e6, 2),
        }
        for b in BATCH_SIZES:
            row[f"p50_ms_b{b}"] = p50[(v, b)]
            row[f"speedup_vs_fp32_b{b}"] = round(p50[("fp32", b)] / p50[(v, b)], 3)
            row[f"mean_ms_b{b}"] = mean[(v, b)]
            if defense:  # the head against the same precision without it, measured in the same run
                row[f"head_overhead_pct_b{b}"] = round(100.0 * (p50[(v, b)] / p50[(precision, b)] - 1.0), 2)
                row[f"head_overhead_mean_pct_b{b}"] = round(100.0 * (mean[(v, b)] / mean[(precision, b)] - 1.0), 2)
        rows.append(row)
    return rows, [r.__dict__ for r in rows_all], {"bench_seconds": bench_s, "bench_during": during, "test_n": len(test)}


def table(rows: list[dict]) -> str:
    b1, b2 = BATCH_SIZES
    lines = [
        f"| variant | accuracy | top-1 = FP32 | size MB | p50 ms b{b1} | vs FP32 b{b1} | p50 ms b{b2} | vs FP32 b{b2} "
        f"| head overhead b{b1} | head overhead b{b2} |",
        "|---|" + "---:|" * 9,
    ]
    for r in rows:
        oh = [f"{r[f'head_overhead_pct_b{b}']:+.1f}%" if f"head_overhead_pct_b{b}" in r else "–" for b in BATCH_SIZES]
        lines.append(
            f"| {r['variant']} | {100 * r['accuracy']:.1f}% | {100 * r['top1_agreement_vs_fp32']:.1f}% | {r['size_mb']:.1f} "
            f"| {r[f'p50_ms_b{b1}']:.2f} | {r[f'speedup_vs_fp32_b{b1}']:.2f}x | {r[f'p50_ms_b{b2}']:.1f} "
            f"| {r[f'speedup_vs_fp32_b{b2}']:.2f}x | {oh[0]} | {oh[1]} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    cpu_before = bench_runtimes._cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-import-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        paths, facts = prepare(args, workdir)
        rows, bench_rows, bench_facts = measure(args, paths)
    wall = time.perf_counter() - t0
    return {
        "machine": {**bench_runtimes.machine(), "during_run": bench_runtimes.contention(
            cpu_before, bench_runtimes._cpu_seconds(), wall)},
        "warning": bench_runtimes.busy_warning(bench_facts["bench_during"]),
        "config": {"size": args.size, "train_epochs": args.train_epochs, "train_n": args.train_n, "test_n": args.test_n,
                   "calib_samples": args.calib_samples, "batch_sizes": list(BATCH_SIZES), "warmup": args.warmup,
                   "iterations_b64": args.iterations, "iterations_b1": args.iterations_b1, "variants": list(VARIANTS),
                   "timing": "bench_artifacts: alternating blocks of consecutive Runner.predict calls per artifact "
                             "(re-warmed after each switch), FP32 first; ONNX Runtime CPUExecutionProvider"},
        "model": facts,
        **bench_facts,
        "rows": rows,
        "bench_rows": bench_rows,
        "total_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["EDGEGUARD_QUIET"] = "0" if args.verbose else "1"
    result = run(args)
    mach, m = result["machine"], result["model"]
    imp = m["import"]
    print(
        f"An imported ResNet-50 ({imp['parameters']:,} parameters, input 3x{args.size}x{args.size}, head {imp['head']}) "
        f"through PTQ (U8S8), in ONNX Runtime (CPU). {mach['processor']}, {mach['cpus']} CPUs, torch {mach['torch']}, "
        f"onnxruntime {mach['onnxruntime']}."
    )
    print(
        f"Timed calls per artifact: {args.iterations_b1} at batch 1, {args.iterations} at batch 64, after "
        f"{args.warmup} warm-up calls; the four files timed in alternating blocks. vs FP32 = FP32 p50 / variant p50 "
        "(>1: faster); head overhead = p50 with the fused heuristic head / p50 of the same precision without it - 1 "
        "(the mean-based ratio is in the JSON).\n"
    )
    print(table(result["rows"]))
    print()
    if result["warning"]:
        print(result["warning"] + "\n")
    user = m["user"]
    print(
        f"user training {user['train_epochs']} epoch(s) ({user.get('train_seconds', 0):.0f}s), import "
        f"{m['import_seconds']:.0f}s, PTQ {m['quantize_seconds']:.0f}s ({m['quantize']['qdq_nodes']} QDQ nodes), "
        f"bench {result['bench_seconds']:.0f}s; test n={result['test_n']}"
    )
    from edgeguard.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\ntotal {result['total_seconds']:.1f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
