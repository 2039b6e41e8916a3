"""PyTorch vs ONNX Runtime latency for the registered models, measured side by side in one run.

For each model: build it with ``create_model`` (untrained: random weights from ``torch.manual_seed(0)``;
latency does not depend on the weights), save it as a bundle, export it to ONNX with ``export_onnx``
(timed; its PyTorch-vs-ORT self-check is recorded), open both artifacts with ``open_runner`` and time
them side by side with ``bench_runners`` (alternating blocks of calls, see edgeguard/evaluate/bench.py).  Prints one Markdown table and writes a JSON file.

    python benchmarks/bench_runtimes.py
    python benchmarks/bench_runtimes.py --models smallcnn --iterations 3 --batch-sizes 1

Batch sizes >= ``--large-batch`` (default 32) use ``--iterations-large`` timed calls, to shorten runs of
big models on small CPUs.
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

# The shapes, class counts and normalisation of the demos each model stands for.
DIGITS_MEAN, DIGITS_STD = (0.305555,), (0.323724,)  # statistics of the digits train split (1x32x32)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelCase:
    arch: str
    like: str  # the demo / dataset whose input it mimics
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CASES = {
    "smallcnn": ModelCase("smallcnn", "digits", (1, 32, 32), 10, DIGITS_MEAN, DIGITS_STD),
    "resnet18": ModelCase("resnet18", "cifar10", (3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD),
    "mobilenetv2": ModelCase("mobilenetv2", "cifar10", (3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "runtimes.json"


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def name_list(choices):
    """argparse type: comma-separated names, each one of ``choices`` (shared by the benchmark scripts)."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown model(s) {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        type=name_list(CASES),
        default=["smallcnn", "resnet18"],
        help="comma-separated (default smallcnn,resnet18)",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 64], help="comma-separated (default 1,64)")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed calls per runner and batch size (default 5)"
    )
    p.add_argument(
        "--iterations", type=int, default=30, help="timed calls per runner and batch size (default 30)"
    )
    p.add_argument(
        "--iterations-large",
        type=int,
        default=None,
        help="timed calls per runner for batch sizes >= --large-batch (default: --iterations)",
    )
    p.add_argument(
        "--large-batch",
        type=int,
        default=32,
        help="batch size from which --iterations-large applies (default 32)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random input batch (default 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON results (default benchmarks/results/runtimes.json)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the bundles and .onnx files here (default: a temp dir, removed)",
    )
    p.add_argument("--verbose", action="store_true", help="show edgeguard progress on stderr")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iterations < 1 or args.large_batch < 1:
        p.error("--warmup must be >= 0, --iterations and --large-batch >= 1")
    if args.iterations_large is None:
        args.iterations_large = args.iterations
    if args.iterations_large < 1:
        p.error("--iterations-large must be >= 1")
    return args


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from edgeguard.evaluate.bench import machine_info

    return {
        **machine_info(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cuda": torch.cuda.is_available(),
    }


def prepare(name: str, workdir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Build ``name`` untrained (seed 0), save it as a bundle, export it; return paths and facts."""
    import torch

    from edgeguard.bundle import ModelSpec, save_bundle, stage_record
    from edgeguard.export import export_onnx
    from edgeguard.models import count_parameters, create_model

    case = CASES[name]
    torch.manual_seed(0)
    net = create_model(
        case.arch, num_classes=case.num_classes, in_channels=case.input_shape[0], mean=case.mean, std=case.std
    )
    spec = ModelSpec(
        case.arch,
        case.num_classes,
        tuple(str(i) for i in range(case.num_classes)),
        case.input_shape,
        case.mean,
        case.std,
        {},
    )
    stage = stage_record(
        "init",
        seed=0,
        weights="random",
        note="untrained: random initial weights from torch.manual_seed(0), for latency benchmarks only",
    )
    bundle = save_bundle(workdir / f"{name}.bundle", net, spec, stages=[stage], dataset=None)
    t0 = time.perf_counter()
    exp = export_onnx(bundle, workdir / f"{name}.onnx")
    export_s = time.perf_counter() - t0
    facts = {
        "model": name,
        "arch": case.arch,
        "like": case.like,
        "input_shape": list(case.input_shape),
        "num_classes": case.num_classes,
        "params": count_parameters(net),
        "weights": "random (torch.manual_seed(0)), untrained",
        "bundle_sha256": bundle.sha256,
        "onnx_bytes": exp.bytes,
        "onnx_sha256": exp.sha256,
        "opset": exp.opset,
        "export_seconds": round(export_s, 3),
        "self_check_max_abs_diff": exp.self_check_max_abs_diff,
        "self_check_top1_agreement": exp.self_check_top1_agreement,
    }
    return bundle.path, Path(exp.path), facts


def bench_model(
    bundle: Path, onnx_path: Path, name: str, args: argparse.Namespace
) -> tuple[list[dict], list[dict], dict]:
    """Torch and ORT side by side; returns (paired rows, raw BenchRows, runner facts)."""
    from edgeguard.evaluate import BenchConfig, bench_runners
    from edgeguard.runtime import open_runner

    small = [b for b in args.batch_sizes if b < args.large_batch]
    large = [b for b in args.batch_sizes if b >= args.large_batch]
    groups = [(small, args.iterations), (large, args.iterations_large)]
    raw: list[dict] = []
    paired: list[dict] = []
    with open_runner(bundle) as torch_runner, open_runner(onnx_path) as ort_runner:
        runners = [torch_runner, ort_runner]
        facts = {
            "torch_device": torch_runner.info.device,
            "ort_providers": list(dict(ort_runner.info.details)["providers"]),
        }
        for sizes, iters in groups:
            if not sizes:
                continue
            cfg = BenchConfig(batch_sizes=tuple(sizes), warmup=args.warmup, iterations=iters, seed=args.seed)
            res = bench_runners(runners, cfg, names=[f"{name}/torch", f"{name}/onnxruntime"])
            rows = [r.__dict__ for r in res.rows]
            raw.extend({**r, "iterations": iters, "warmup": args.warmup} for r in rows)
            for bs in sizes:
                t, o = (
                    next(r for r in rows if r["batch"] == bs and r["backend"] == b)
                    for b in ("torch", "onnxruntime")
                )
                paired.append(
                    {
                        "model": name,
                        "batch": bs,
                        "iterations": iters,
                        "torch_p50_ms": t["p50_ms"],
                        "ort_p50_ms": o["p50_ms"],
                        "ort_speedup_p50": o["ratio_p50"],  # torch p50 / ort p50, from bench_runners
                        "torch_p90_ms": t["p90_ms"],
                        "ort_p90_ms": o["p90_ms"],
                        "torch_img_s": t["throughput"],
                        "ort_img_s": o["throughput"],
                    }
                )
    paired.sort(key=lambda r: args.batch_sizes.index(r["batch"]))
    return paired, raw, facts


def table(rows: list[dict], params: dict[str, int]) -> str:
    head = (
        "| model | params | batch | PyTorch p50 ms | ORT p50 ms | ORT speed-up | PyTorch img/s | ORT img/s "
        "| PyTorch p90 ms | ORT p90 ms |"
    )
    lines = [head, "|---|" + "---:|" * 9]
    for r in rows:
        line = (
            f"| {r['model']} | {params[r['model']]:,} | {r['batch']} | {r['torch_p50_ms']:.3f} | {r['ort_p50_ms']:.3f} "
            f"| {r['ort_speedup_p50']:.2f}x | {r['torch_img_s']:,.0f} | {r['ort_img_s']:,.0f} "
            f"| {r['torch_p90_ms']:.3f} | {r['ort_p90_ms']:.3f} |"
        )
        lines.append(line)
    return "\n".join(lines)


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, steal seconds, the CPU seconds of this process and of its children
    that have ended, e.g. a benchmark's worker pool); Linux only."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return (user + nice + system + irq + softirq) / tick, steal / tick, own.user + own.system + own.children_user + own.children_system


def contention(before, after, wall: float) -> dict[str, Any]:
    """CPU time other processes (and the hypervisor, as steal) used while we ran, in cores on average."""
    if before is None or after is None or wall <= 0:
        return {}
    busy, steal, own = (a - b for a, b in zip(after, before, strict=True))
    return {
        "other_processes_cores": round(max(busy - own, 0.0) / wall, 2),
        "steal_cores": round(steal / wall, 2),
    }


def busy_warning(c: dict[str, Any]) -> str | None:
    """Other work on the CPUs skews every number (PyTorch's OpenMP threads wait on a busy core)."""
    other, steal = c.get("other_processes_cores", 0.0), c.get("steal_cores", 0.0)
    if other > 0.2 or steal > 0.2:
        return (
            f"warning: during the run other processes kept {other:.2f} cores busy on average (hypervisor steal "
            f"{steal:.2f}); they compete with the benchmark and inflate latencies, PyTorch's most. "
            "Re-run on an idle machine."
        )
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    cpu_before = _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models, rows, raw = [], [], []
        for name in args.models:
            print(f"[{name}] build, save bundle, export ONNX ...", file=sys.stderr, flush=True)
            bundle, onnx_path, facts = prepare(name, workdir)
            print(
                f"[{name}] benchmark PyTorch vs ONNX Runtime at batch {args.batch_sizes} ...",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.perf_counter()
            paired, bench_rows, runner_facts = bench_model(bundle, onnx_path, name, args)
            facts.update(runner_facts, bench_seconds=round(time.perf_counter() - t0, 2))
            if args.workdir:
                facts.update(bundle=str(bundle), onnx=str(onnx_path))
            models.append(facts)
            rows.extend(paired)
            raw.extend(bench_rows)
    wall = time.perf_counter() - t_start
    busy = contention(cpu_before, _cpu_seconds(), wall)
    warning = busy_warning(busy)
    return {
        "note": "untrained models (random weights, torch.manual_seed(0)): latency only, accuracy is meaningless",
        "machine": {
            **machine(),
            "during_run": busy,
        },
        "warning": warning,
        "config": {
            "models": args.models,
            "batch_sizes": args.batch_sizes,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "iterations_large": args.iterations_large,
            "large_batch": args.large_batch,
            "seed": args.seed,
            "timing": "bench_runners: alternating blocks of consecutive calls per runtime (re-warmed after each switch); Runner.predict wall time",
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
    params = {m["model"]: m["params"] for m in result["models"]}
    mach = result["machine"]
    print(
        f"Untrained models (random weights, seed 0): latency only. {mach['processor']}, {mach['cpus']} CPUs, "
        f"torch {mach['torch']} ({mach['torch_threads']} threads), onnxruntime {mach['onnxruntime']}."
    )
    iters = (
        f"{args.iterations}"
        if args.iterations == args.iterations_large
        else f"{args.iterations} (batch < {args.large_batch}), {args.iterations_large} (batch >= {args.large_batch})"
    )
    print(
        f"Timed calls per runtime and batch: {iters}, after {args.warmup} warm-up calls; PyTorch and ORT "
        "timed in alternating blocks. ORT speed-up = PyTorch p50 / ORT p50 (>1: ORT faster).\n"
    )
    print(table(result["rows"], params))
    print()
    if result["warning"]:
        print(result["warning"] + "\n")
    for m in result["models"]:
        print(
            f"{m['model']}: export {m['export_seconds']:.1f}s, {m['onnx_bytes'] / 1e6:.2f} MB, self-check max |Δprob| "
            f"{m['self_check_max_abs_diff']:.1e}, top-1 agreement {m['self_check_top1_agreement']:.3f}"
        )
    from edgeguard.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\ntotal {result['total_seconds']:.1f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
