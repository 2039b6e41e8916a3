"""Output defenses: what each costs and changes, measured side by side in one run.

Four parts, one JSON file (``benchmarks/results/defenses.json``) and Markdown tables on stdout:

1. **Measurements on a trained model** (smallcnn on digits, trained here): for every defense, the exported
   artifact against its own undefended view: defender accuracy, argmax agreement, mean/max L1 on the test split
   and on an out-of-distribution set (synthetic gratings), latency ratio at batch 1 and 64 (alternating blocks).
   Also the heuristic's top-1 flip rate without its guard.
2. **Head overhead on ResNet-18** (3x32x32, 10 classes, a few training steps on synthetic data) in ONNX
   Runtime: every fused defense against ``none`` at batch 1 and 64, same run.  Goal for the heuristic: <= 2%.
3. **MAD vs the heuristic per query** (host-side MAD with a ResNet-18 surrogate, autograd Jacobians as in the
   original, vs the fused heuristic), batch 1, same run: the seed paper claims x37 for its heuristic over the
   state of the art; we report our ratio.
4. **ModelGuard-W**: the exact sort-based solver (float64 on the host, and the fused float32 head) against PuLP/CBC
   on random probability vectors, K=10 and K=100: objective gap and per-query speed-up (goal >= 100x).

    python benchmarks/bench_defenses.py                 # about 10 minutes on 2 CPU cores
    python benchmarks/bench_defenses.py --quick         # smaller counts, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "defenses.json"
DEFENSES_TRAINED = [  # (name, params) measured on the trained digits model
    ("heuristic", {}),
    ("heuristic", {"top1_guard": False}),
    ("reverse_sigmoid", {}),
    ("rounding", {}),
    ("topk", {"k": 1}),
    ("topk", {"k": 3}),
    ("gaussian", {"deterministic": True}),
    ("adaptive_misinformation", {}),
    ("modelguard_s", {}),
    ("modelguard_w", {}),
    ("mad", {"jacobian": "closed_form"}),
]
FUSED_RESNET = ["heuristic", "reverse_sigmoid", "rounding", "topk", "gaussian", "modelguard_s", "modelguard_w",
                "adaptive_misinformation"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small counts everywhere (smoke run, numbers are noisy).")
    p.add_argument("--parts", default="trained,resnet,mad,modelguard_w", help="Comma-separated parts to run.")
    p.add_argument("--iterations", type=int, default=None, help="Timed calls per batch size and runner.")
    p.add_argument("--lp-vectors", type=int, default=None, help="Random vectors per K for the ModelGuard-W comparison.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    unknown = set(a.parts.split(",")) - {"trained", "resnet", "mad", "modelguard_w"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")
    a.iterations = a.iterations or (10 if a.quick else 60)
    a.lp_vectors = a.lp_vectors or (20 if a.quick else 200)
    return a


def part_trained(work: Path, iterations: int, quick: bool) -> dict[str, Any]:
    from edgeguard.api import export_bundle, train_bundle
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.data import default_ood, load_data
    from edgeguard.defenses import defense_label
    from edgeguard.evaluate import BenchConfig
    from edgeguard.evaluate.defense import measure_defense
    from edgeguard.runtime import open_runner
    from edgeguard.training import TrainConfig

    bundle = work / "digits"
    train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=3 if quick else 10, lr=0.05), bundle)
    test = load_data(DataConfig("digits"), "test")
    ood = load_data(default_ood(test.info.input_shape), "test")
    bench = BenchConfig(batch_sizes=(1, 64), warmup=3, iterations=iterations)
    rows = []
    for i, (name, params) in enumerate(DEFENSES_TRAINED):
        t0 = time.perf_counter()
        res = export_bundle(bundle, work / f"d{i}.onnx", defense=name, defense_params=params)
        build_s = time.perf_counter() - t0
        with open_runner(res.path) as defended, open_runner(res.path, undefended=True) as clean:
            m = measure_defense(defended, clean, test, ood, bench=bench, params=params, placement=res.placement)
        rows.append({**m.row(), "defense": defense_label(name, params), "build_and_export_s": round(build_s, 2)})
        print(f"  measured {rows[-1]['defense']}", file=sys.stderr)
    return {"model": "smallcnn on digits", "rows": rows}


def _resnet_bundle(work: Path, quick: bool) -> Path:
    from edgeguard.api import train_bundle
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.training import TrainConfig

    out = work / "resnet18"
    data = DataConfig("synthetic", options={"n": 256, "size": 32, "channels": 3})
    train_bundle(data, ModelConfig("resnet18"), TrainConfig(epochs=1, batch_size=64, lr=0.05, max_steps=2 if quick else 4), out)
    return out


def part_resnet(work: Path, bundle: Path, iterations: int) -> dict[str, Any]:
    from edgeguard.api import export_bundle
    from edgeguard.evaluate import BenchConfig, bench_runners
    from edgeguard.runtime import open_runner

    paths = {"none": export_bundle(bundle, work / "r_none.onnx").path}
    for name in FUSED_RESNET:
        params = {"epochs": 1} if name == "adaptive_misinformation" else {}
        params = {"deterministic": True} if name == "gaussian" else params
        paths[name] = export_bundle(bundle, work / f"r_{name}.onnx", defense=name, defense_params=params).path
        print(f"  exported resnet18 + {name}", file=sys.stderr)
    cfg = BenchConfig(batch_sizes=(1, 64), warmup=5, iterations=iterations, rounds=4)
    rows = []
    for name in FUSED_RESNET:  # each defense against `none`, alternating blocks, in one run per pair
        with open_runner(paths["none"]) as base, open_runner(paths[name]) as defended:
            res = bench_runners([base, defended], cfg, names=["none", name])
        for bs in cfg.batch_sizes:
            b, d = (r for r in res.rows if r.batch == bs)
            rows.append({"defense": name, "batch": bs, "none_p50_ms": b.p50_ms, "defended_p50_ms": d.p50_ms,
                         "overhead_pct": round(100.0 * (d.p50_ms / b.p50_ms - 1.0), 2)})
    return {"model": "resnet18 3x32x32, 10 classes", "rows": rows}


def part_mad(work: Path, bundle: Path, iterations: int) -> dict[str, Any]:
    """Per-query cost at batch 1: heuristic (fused) vs MAD (host, autograd and closed form), same run."""
    from edgeguard.api import export_bundle
    from edgeguard.evaluate import BenchConfig, bench_runners
    from edgeguard.runtime import open_runner

    heur = export_bundle(bundle, work / "m_heuristic.onnx", defense="heuristic").path
    mad_a = export_bundle(bundle, work / "m_mad.onnx", defense="mad").path
    mad_c = export_bundle(bundle, work / "m_mad_cf.onnx", defense="mad", defense_params={"jacobian": "closed_form"}).path
    none = export_bundle(bundle, work / "m_none.onnx").path
    cfg = BenchConfig(batch_sizes=(1,), warmup=3, iterations=iterations, rounds=3)
    runners = [open_runner(p) for p in (none, heur, mad_a, mad_c)]
    try:
        res = bench_runners(runners, cfg, names=["none", "heuristic", "mad (autograd)", "mad (closed form)"])
    finally:
        for r in runners:
            r.close()
    p50 = {r.artifact: r.p50_ms for r in res.rows}
    return {"model": "resnet18 (victim and MAD surrogate)", "p50_ms_per_query": p50,
            "mad_autograd_over_heuristic": round(p50["mad (autograd)"] / p50["heuristic"], 2),
            "mad_closed_form_over_heuristic": round(p50["mad (closed form)"] / p50["heuristic"], 2),
            "heuristic_overhead_pct_vs_none": round(100 * (p50["heuristic"] / p50["none"] - 1), 2),
            "mad_autograd_defense_only_ms": round(p50["mad (autograd)"] - p50["none"], 3),
            "heuristic_defense_only_ms": round(p50["heuristic"] - p50["none"], 3)}


def _random_vectors(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    half = n // 2
    dir_ = np.concatenate([rng.dirichlet(np.full(k, a), size=half // 3 + 1) for a in (0.1, 1.0, 10.0)])[:half]
    z = rng.standard_normal((n - half, k)) * rng.choice([0.5, 2.0, 5.0], size=(n - half, 1))
    soft = np.exp(z - z.max(1, keepdims=True))
    return np.concatenate([dir_, soft / soft.sum(1, keepdims=True)])


def part_modelguard_w(n: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from edgeguard.defenses import DefenseContext, make_defense
    from edgeguard.defenses.modelguard_w import lp_reference, objective, solve_sort
    from edgeguard.export.heads import head_proto

    rows = []
    for k in (10, 100):
        y = _random_vectors(n, k, seed=k)
        for eps in (0.5, 1.0):
            t0 = time.perf_counter()
            lp = np.stack([lp_reference(y[i : i + 1], eps)[0] for i in range(n)])
            t_lp = (time.perf_counter() - t0) / n
            yt = torch.from_numpy(y)
            solve_sort(yt[:2], eps)  # warm-up
            t0 = time.perf_counter()
            ours = np.concatenate([solve_sort(yt[i : i + 1], eps).numpy() for i in range(n)])
            t_sort1 = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            solve_sort(yt, eps)
            t_sort_b = (time.perf_counter() - t0) / n
            head = make_defense("modelguard_w", {"epsilon": eps}, DefenseContext(num_classes=k))
            sess = ort.InferenceSession(head_proto(head, (1, 1, 1), 20).SerializeToString(), providers=["CPUExecutionProvider"])
            logits = np.log(np.maximum(y, 1e-30)).astype(np.float32)
            name = sess.get_inputs()[0].name
            sess.run(None, {name: logits[:1]})
            t0 = time.perf_counter()
            graph = np.concatenate([sess.run(None, {name: logits[i : i + 1]})[0] for i in range(n)])
            t_graph1 = (time.perf_counter() - t0) / n
            gap = objective(y, ours) - objective(y, lp)
            gap32 = objective(y, graph.astype(np.float64)) - objective(y, lp)
            rows.append({"K": k, "epsilon": eps, "vectors": n, "max_gap_float64": float(np.max(np.abs(gap))),
                         "max_gap_onnx_float32": float(np.max(np.abs(gap32))),
                         "pulp_ms_per_query": round(t_lp * 1e3, 3), "sort_ms_per_query_b1": round(t_sort1 * 1e3, 4),
                         "sort_ms_per_query_batched": round(t_sort_b * 1e3, 4),
                         "onnx_ms_per_query_b1": round(t_graph1 * 1e3, 4),
                         "speedup_b1": round(t_lp / t_sort1, 1), "speedup_batched": round(t_lp / t_sort_b, 1),
                         "speedup_onnx_b1": round(t_lp / t_graph1, 1)})
            print(f"  modelguard_w K={k} eps={eps}", file=sys.stderr)
    return {"rows": rows}


def _md(head: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def render(results: dict[str, Any]) -> str:
    out = []
    if "trained" in results:
        out += ["### Defenses on the trained digits model (each vs its own undefended view)", ""]
        out.append(_md(["defense", "runs in", "accuracy", "agreement", "L1 test mean (max)", "L1 OOD mean", "OOD agreement",
                        "latency x b1", "latency x b64"],
                       [[r["defense"], r["placement"], f"{r['accuracy']:.4f}", f"{r['agreement']:.4f}",
                         f"{r['l1_mean']:.4f} ({r['l1_max']:.3f})", f"{r['ood_l1_mean']:.4f}", f"{r['ood_agreement']:.4f}",
                         f"{r.get('latency_ratio_b1', float('nan')):.3f}", f"{r.get('latency_ratio_b64', float('nan')):.3f}"]
                        for r in results["trained"]["rows"]]))
        out.append("")
    if "resnet" in results:
        out += ["### Fused head overhead on ResNet-18 in ONNX Runtime (p50, same run as `none`)", ""]
        out.append(_md(["defense", "batch", "none ms", "defended ms", "overhead"],
                       [[r["defense"], r["batch"], f"{r['none_p50_ms']:.3f}", f"{r['defended_p50_ms']:.3f}",
                         f"{r['overhead_pct']:+.2f}%"] for r in results["resnet"]["rows"]]))
        out.append("")
    if "mad" in results:
        m = results["mad"]
        out += ["### Per-query cost at batch 1: heuristic (fused) vs MAD (host)", ""]
        out.append(_md(["runner", "p50 ms / query"], [[k, f"{v:.3f}"] for k, v in m["p50_ms_per_query"].items()]))
        out += ["", f"MAD (autograd) / heuristic: x{m['mad_autograd_over_heuristic']}; MAD (closed form) / heuristic: "
                f"x{m['mad_closed_form_over_heuristic']}; defense-only cost: MAD {m['mad_autograd_defense_only_ms']} ms, "
                f"heuristic {m['heuristic_defense_only_ms']} ms", ""]
    if "modelguard_w" in results:
        out += ["### ModelGuard-W: exact sort solver vs PuLP/CBC", ""]
        out.append(_md(["K", "eps", "n", "max |Δobj| f64", "max |Δobj| ONNX f32", "PuLP ms", "sort ms (b1)", "speed-up b1",
                        "speed-up batched", "speed-up ONNX b1"],
                       [[r["K"], r["epsilon"], r["vectors"], f"{r['max_gap_float64']:.1e}", f"{r['max_gap_onnx_float32']:.1e}",
                         r["pulp_ms_per_query"], r["sort_ms_per_query_b1"], f"{r['speedup_b1']}x", f"{r['speedup_batched']}x",
                         f"{r['speedup_onnx_b1']}x"] for r in results["modelguard_w"]["rows"]]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("EDGEGUARD_QUIET", "1")
    from edgeguard.evaluate.bench import machine_info

    parts = args.parts.split(",")
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "trained" in parts:
            results["trained"] = part_trained(work, args.iterations, args.quick)
        if "resnet" in parts or "mad" in parts:
            bundle = _resnet_bundle(work, args.quick)
            if "resnet" in parts:
                results["resnet"] = part_resnet(work, bundle, args.iterations)
            if "mad" in parts:
                results["mad"] = part_mad(work, bundle, args.iterations)
        if "modelguard_w" in parts:
            results["modelguard_w"] = part_modelguard_w(args.lp_vectors)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"\nwrote {args.out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
