"""One grid cell, timed: a KnockoffNets extraction at each budget against the grid-mnist victim, where the time goes.

Victim and cells come from a grid config (default ``configs/grid-mnist.yaml``: smallcnn trained 10 epochs on
mnist5k, exported to ONNX without a defense; KnockoffNets from scikit-learn's digits framed 28x28, 10 surrogate
epochs, fidelity on the 1,000 mnist5k test images); each cell is exactly what ``edgeguard evaluate grid`` runs
(``edgeguard.grid.tasks.run_cell``, one torch thread).  Two modes, in one run:

- ``alone``: one cell at a time on one core (the grid's per-cell cost; the target is <= 20 s at budget 2k);
- ``pair``: two cells at once in two worker processes, as ``workers: 2`` runs them on a 2-core machine.

Every cell reports its phases (setup, answering queries, the attack's own work, evaluation).  A table goes to
stdout, JSON to ``benchmarks/results/cell.json``, progress to stderr.

    python benchmarks/bench_cell.py                       # about 100 s on 2 cores
    python benchmarks/bench_cell.py --budgets 2000 --seeds 1 --modes alone    # one cell, about 40 s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes  # noqa: E402  (a script in this folder: machine info and the busy-machine check)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cell.json"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grid-mnist.yaml"
PHASES = ("setup", "queries", "attack", "evaluation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="500,1000,2000", help="Comma-separated KnockoffNets query budgets.")
    p.add_argument("--seeds", type=int, default=2, help="Cells per budget and mode (attack seeds 0..N-1); pair needs 2.")
    p.add_argument("--modes", default="alone,pair", help="Comma-separated: alone, pair.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="The grid whose victim and KnockoffNets cells are timed.")
    p.add_argument("--victim-epochs", type=int, default=None, help="Override the victim's training epochs (a smoke run).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    try:
        a.budgets = [int(b) for b in a.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets must be comma-separated integers (got {a.budgets!r})")
    a.modes = a.modes.split(",")
    if set(a.modes) - {"alone", "pair"}:
        p.error(f"unknown mode(s) {sorted(set(a.modes) - {'alone', 'pair'})}")
    if a.seeds < 1 or ("pair" in a.modes and a.seeds < 2):
        p.error("--seeds must be >= 1 (>= 2 with the pair mode)")
    return a


def load_grid(path: Path, victim_epochs: int | None):
    from edgeguard.grid.config import GridConfig

    cfg = GridConfig.load(path)
    if victim_epochs is not None:
        cfg = dataclasses.replace(cfg, victim=dataclasses.replace(
            cfg.victim, train=dataclasses.replace(cfg.victim.train, epochs=victim_epochs)))
    return cfg


def victim(cfg, work: Path) -> Path:
    """The grid's victim, trained as the grid trains it (its data, model, schedule and seed), exported undefended."""
    from edgeguard.api import export_bundle, train_bundle

    v = cfg.victim
    bundle = work / "victim"
    train_bundle(v.data, v.model, dataclasses.replace(v.train, seed=cfg.seed), bundle)
    return export_bundle(bundle, work / "victim.onnx").path


def knockoff_points(cfg, budgets: list[int]) -> dict[int, Any]:
    """The grid's KnockoffNets attack points at the budgets asked for (each one cell's settings, less the seed)."""
    points = {p.params["budget"]: p for p in cfg.attack_points() if p.method == "knockoff"}
    missing = [b for b in budgets if b not in points]
    if missing:
        raise SystemExit(f"the grid config has no KnockoffNets point at budget(s) {missing} (it has {sorted(points)})")
    return {b: points[b] for b in budgets}


def cell_job(cfg, point, artifact: Path, seed: int, **overrides: Any) -> dict[str, Any]:
    """One cell exactly as ``run_grid`` hands it to ``run_cell``."""
    return {"method": point.method, "artifact": str(artifact), "eval": cfg.eval.to_dict(),
            "config": {**point.config(seed).params(), **overrides}}


def run_mode(ex: Any, mode: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells of one budget: one at a time (alone) or two at once in the two workers (pair)."""
    from edgeguard.grid.tasks import run_cell

    step = 1 if mode == "alone" else 2
    rows = []
    for start in range(0, len(jobs), step):
        batch = jobs[start : start + step]
        for job in batch:
            ex.submit(run_cell, job)
        for _ in batch:
            _, job, out = ex.next_done()
            if not out["ok"]:
                raise SystemExit(f"the {mode} cell at budget {r_budget(job)}, seed {job['config']['seed']} failed: "
                                 f"{out['error']}")
            r = out["result"]
            rows.append({"mode": mode, "budget": r_budget(job), "seed": job["config"]["seed"], "queries": r["queries_used"],
                         "seconds": r["seconds"], **{f"{k}_s": r["timings"][k] for k in PHASES},
                         "surrogate_accuracy": r["surrogate_accuracy"], "fidelity": r["fidelity"]})
            print(f"  {mode} budget {rows[-1]['budget']} seed {rows[-1]['seed']}: {r['seconds']:.1f} s, "
                  f"fidelity {r['fidelity']:.3f}", file=sys.stderr, flush=True)
    return rows


def r_budget(job: dict[str, Any]) -> int:
    return job["config"]["budget"]


def executors(modes: list[str], warm_job: dict[str, Any]) -> dict[str, Any]:
    """One executor per mode, made once and warmed up (imports, oneDNN kernels) with an untimed small cell per
    worker, as a grid's long-lived workers are after their first cell."""
    from edgeguard.grid.tasks import Executor, run_cell

    out = {}
    for m in modes:
        ex = out[m] = Executor("local", 1 if m == "alone" else 2)
        for _ in range(ex.workers):
            ex.submit(run_cell, warm_job)
        for _ in range(ex.workers):
            ex.next_done()
    return out


def summarise(rows: list[dict[str, Any]], budgets: list[int], modes: list[str]) -> list[dict[str, Any]]:
    out = []
    for b in budgets:
        alone = [r["seconds"] for r in rows if r["budget"] == b and r["mode"] == "alone"]
        for m in modes:
            sel = [r for r in rows if r["budget"] == b and r["mode"] == m]
            mean = {k: round(statistics.fmean(r[k] for r in sel), 2) for k in ("seconds", *(f"{p}_s" for p in PHASES))}
            row = {"budget": b, "mode": m, "cells": len(sel), "queries": sel[0]["queries"], **mean,
                   "max_seconds": max(r["seconds"] for r in sel),
                   "fidelity": round(statistics.fmean(r["fidelity"] for r in sel), 4)}
            if m == "pair" and alone:
                row["over_alone"] = round(mean["seconds"] / statistics.fmean(alone), 2)
            out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| budget | mode | cells | queries | seconds (mean) | setup | answering queries | attack (training) | evaluation "
             "| vs alone | fidelity |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        ratio = f"{r['over_alone']:.2f}x" if "over_alone" in r else "–"
        lines.append(f"| {r['budget']} | {r['mode']} | {r['cells']} | {r['queries']} | {r['seconds']:.2f} "
                     f"| {r['setup_s']:.2f} | {r['queries_s']:.2f} | {r['attack_s']:.2f} | {r['evaluation_s']:.2f} | {ratio} "
                     f"| {r['fidelity']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("EDGEGUARD_QUIET", "1")
    from edgeguard.errors import EdgeguardError

    try:
        grid = load_grid(args.config, args.victim_epochs)
        points = knockoff_points(grid, args.budgets)
    except (EdgeguardError, OSError) as e:
        raise SystemExit(f"bench_cell: {e}") from None
    t_start = time.perf_counter()
    cpu_before = bench_runtimes._cpu_seconds()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-cell-") as tmp:
        v = grid.victim
        print(f"training the victim ({v.model.arch} on {v.data.name}, {v.train.epochs} epochs) ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        artifact = victim(grid, Path(tmp))
        victim_s = time.perf_counter() - t0
        pools = executors(args.modes, cell_job(grid, points[args.budgets[0]], artifact, 0, budget=64, epochs=1))
        try:
            for b in args.budgets:
                for m in args.modes:
                    jobs = [cell_job(grid, points[b], artifact, s) for s in range(args.seeds)]
                    rows.extend(run_mode(pools[m], m, jobs))
        finally:
            for ex in pools.values():
                ex.close()
    wall = time.perf_counter() - t_start
    busy = bench_runtimes.contention(cpu_before, bench_runtimes._cpu_seconds(), wall)
    summary = summarise(rows, args.budgets, args.modes)
    result = {"machine": {**bench_runtimes.machine(), "during_run": busy}, "warning": bench_runtimes.busy_warning(busy),
              "config": {"grid": str(args.config), "budgets": args.budgets, "seeds": args.seeds, "modes": args.modes,
                         "victim_epochs": grid.victim.train.epochs},
              "victim_seconds": round(victim_s, 2), "summary": summary, "cells": rows, "total_seconds": round(wall, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary))
    if result["warning"]:
        print(result["warning"], file=sys.stderr)
    print(f"wrote {args.out} ({wall:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
