"""The run: the run folder, the victim bundle, exports, cells (resumable) and the report."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard import __version__
from edgeguard.bundle import bundle_data_config, is_bundle, load_bundle
from edgeguard.config import DataConfig, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.fileio import atomic_write_bytes, atomic_write_json, check_run_dir, claim_run_dir
from edgeguard.grid.config import GRID_MARKER, GRID_VERSION, GridConfig, short_hash
from edgeguard.grid.report import plot_attack, render_markdown, slug, summarize, summary_tables
from edgeguard.grid.tasks import Executor, Job, check_backend, failure_record, run_cell, run_export
from edgeguard.progress import log, task
from edgeguard.results import ReportResult
from edgeguard.verbs import train_bundle

# --- the run folder and the victim ----------------------------------------------------------------------------------


def _victim_settings(cfg: GridConfig) -> tuple[DataConfig, tuple[int, ...], int]:
    """The evaluation set and the victim's input shape and class count, without training anything."""

    v = cfg.victim
    if v.bundle is not None:
        b = load_bundle(v.bundle, verify=False)
        shape, classes, default = tuple(b.spec.input_shape), int(b.spec.num_classes), bundle_data_config(b)
    else:
        train = load_data(v.data, "train")
        shape, classes, default = tuple(train.info.input_shape), int(train.num_classes), v.data
    ev = cfg.eval or default
    test = load_data(ev, "test")
    if tuple(test.info.input_shape) != shape or test.num_classes != classes:
        raise BadInput(f"the evaluation set {ev.name!r} ({test.num_classes} classes, {tuple(test.info.input_shape)}) does "
                       f"not fit the victim ({classes} classes, {shape})")
    return ev, shape, classes


def _victim_bundle(cfg: GridConfig, out: Path) -> tuple[Path, str, dict[str, Any]]:
    """The victim bundle's path and sha256, training it into ``OUT/victim`` unless given (or trained already)."""

    v = cfg.victim
    if v.bundle is not None:
        b = load_bundle(v.bundle)  # verifies every file against the manifest
        return Path(v.bundle), b.sha256, {"bundle": str(v.bundle), "sha256": b.sha256, "trained": False}
    train = dataclasses.replace(v.train, seed=cfg.seed)
    key = short_hash({"data": v.data.to_dict(), "model": v.model.to_dict(), "train": train.to_dict()})
    path, stamp = out / "victim", out / "victim.json"
    if is_bundle(path) and stamp.is_file():
        try:
            rec = json.loads(stamp.read_text())
            b = load_bundle(path)
            if rec.get("key") == key and rec.get("sha256") == b.sha256:
                log(f"victim: reusing {path} (sha256 {b.sha256[:12]})")
                return path, b.sha256, {**rec, "reused": True}
        except (BadInput, ValueError, OSError):
            pass
    log(f"== training the victim: {v.model.arch} on {v.data.name}, {train.epochs} epochs")
    res = train_bundle(v.data, v.model, train, path)
    fit = {k: x for k, x in res.to_json().items() if k != "history"}
    rec = {"key": key, "bundle": str(path), "sha256": res.sha256, "trained": True, "train": fit}
    atomic_write_json(stamp, rec)
    return path, res.sha256, rec



# --- the run --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridResult(ReportResult):
    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.report["summary"]

    def table(self) -> str:
        return summary_tables(self.rows)

    def summary(self) -> str:
        c = self.report["counts"]
        return (self.table() + f"\n{c['done']}/{c['cells']} cells done (computed {c['computed']}, reused "
                f"{c['reused']}, failed {c['failed']}); report: {Path(self.out) / 'grid.md'}")


def _read_cell(path: Path, cell_id: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("cell_id") == cell_id and isinstance(rec.get("result"), dict)
    return rec if ok else None


def _plan(cfg: GridConfig, out: Path, victim_sha: str, dpoints, apoints, eval_dict: dict[str, Any]):
    """Every cell's id (defense point x attack point x seed, where the attack applies) and the records already on
    disk: (defense keys, ids by (di, ai, seed), cells, records)."""
    dkeys = [short_hash({"victim": victim_sha, "defense": d.spec()}) for d in dpoints]
    ids: dict[tuple[int, int, int], str] = {}
    cells: list[dict[str, Any]] = []
    records: dict[str, dict[str, Any]] = {}
    for di, d in enumerate(dpoints):
        for ai, a in enumerate(apoints):
            if not a.meets(d):
                continue
            for s in cfg.seeds:
                attack_cfg = a.config(s).params()
                cid = short_hash({"victim": victim_sha, "defense": d.spec(), "method": a.method, "attack": attack_cfg,
                                  "seed": s, "eval": eval_dict, "grid_version": GRID_VERSION}, 20)
                ids[di, ai, s] = cid
                cells.append({"cell_id": cid, "di": di, "ai": ai, "seed": s, "method": a.method, "config": attack_cfg})
                rec = _read_cell(out / "cells" / f"{cid}.json", cid)
                if rec is not None:
                    records[cid] = rec
    return dkeys, ids, cells, records


class _Tasks:
    """The exports (one per defense point that still has cells to run, unless cached) and the cells, in one pool:
    a cell is submitted as soon as its defense point's artifact exists.  Each finished cell is written at once
    (resumable)."""

    def __init__(self, out: Path, dpoints, apoints, dkeys, eval_dict, victim_sha: str, records: dict[str, Any]):
        self.out, self.dpoints, self.apoints, self.dkeys = out, dpoints, apoints, dkeys
        self.eval_dict, self.victim_sha, self.records = eval_dict, victim_sha, records
        self.failures: list[dict[str, Any]] = []
        self.computed: list[str] = []
        self.busy = {"export": 0.0, "cells": 0.0}

    def cell_job(self, c: Job) -> Job:
        return {**c, "artifact": str(self.out / "artifacts" / self.dkeys[c["di"]] / "model.onnx"), "eval": self.eval_dict}

    def record(self, job: Job, outcome: dict[str, Any]) -> str:
        d, a = self.dpoints[job["di"]], self.apoints[job["ai"]]
        what = f"{d.label} x {a.label} seed {job['seed']}"
        if not outcome["ok"]:
            self.failures.append(failure_record(f"cell {job['cell_id']} ({what})", outcome, cell_id=job["cell_id"]))
            return f"{what}: FAILED: {outcome['error']}"
        key = self.dkeys[job["di"]]
        rec = {"cell_id": job["cell_id"], "grid_version": GRID_VERSION, "victim_sha256": self.victim_sha,
               "defense": {"name": d.name, "params": d.params, "label": d.label, "config": d.full, "key": key},
               "attack": {"method": a.method, "params": a.params, "label": a.label, "config": job["config"]},
               "seed": job["seed"], "eval": self.eval_dict, "artifact": f"artifacts/{key}/model.onnx",
               "result": outcome["result"], "seconds": outcome["seconds"],
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(self.out / "cells" / f"{job['cell_id']}.json", rec)  # as soon as it finishes: resumable
        self.records[job["cell_id"]] = rec
        self.computed.append(job["cell_id"])
        self.busy["cells"] += outcome["seconds"]
        r = outcome["result"]
        return (f"{what}: surrogate acc {r['surrogate_accuracy']:.4f}, fidelity {r['fidelity']:.4f}, "
                f"defender acc {r['defender_accuracy']:.4f} ({outcome['seconds']:.0f} s)")

    def run(self, name: str, pending: list[Job], bundle: Path, backend: str, workers: int) -> None:
        ready: set[int] = set()
        export_jobs: list[Job] = []
        for di in sorted({c["di"] for c in pending}):
            folder = self.out / "artifacts" / self.dkeys[di]
            if (folder / "export.json").is_file() and (folder / "model.onnx").is_file():
                ready.add(di)
            else:
                d = self.dpoints[di]
                export_jobs.append({"di": di, "key": self.dkeys[di], "dir": str(folder), "bundle": str(bundle),
                                    "name": d.name, "params": d.params, "spec": d.spec()})
        if not (export_jobs or pending):
            return
        export_fn, cell_fn = run_export, run_cell  # looked up at call time (tests count the calls)
        if export_jobs:
            log(f"== exporting {len(export_jobs)} defended artifacts, then {len(pending)} cells")
            (self.out / "artifacts").mkdir(parents=True, exist_ok=True)
        ex = Executor(backend, workers)
        try:
            for job in export_jobs:
                ex.submit(export_fn, job)
            for c in pending:
                if c["di"] in ready:
                    ex.submit(cell_fn, self.cell_job(c))
            with task(f"grid {name}", total=len(pending)) as bar:
                while len(ex):
                    fn, job, outcome = ex.next_done()
                    if "cell_id" in job:
                        bar.advance(1)
                        bar.note(self.record(job, outcome))
                        continue
                    label = self.dpoints[job["di"]].label
                    if outcome["ok"]:
                        log(f"exported {label} ({outcome['seconds']:.0f} s)")
                        self.busy["export"] += outcome["seconds"]
                        for c in pending:
                            if c["di"] == job["di"]:
                                ex.submit(cell_fn, self.cell_job(c))
                    else:
                        self.failures.append(failure_record(f"export {label}", outcome))
                        n = sum(1 for c in pending if c["di"] == job["di"])
                        bar.advance(n)
                        bar.note(f"export {label} FAILED ({n} cells not run): {outcome['error']}")
        except BaseException:
            ex.close(cancel=True)
            raise
        ex.close()


def _plots(out: Path, cfg: GridConfig, apoints, summary, victim_sha: str, eval_name: str) -> list[dict[str, str]]:
    """One plot per attack point with results: defender accuracy against attacker accuracy and fidelity."""
    plots = []
    (out / "plots").mkdir(exist_ok=True)
    for ai, a in enumerate(apoints):
        rows = [r for r in summary if r["attack"] == a.label]
        if not any(r["seeds"] for r in rows):
            continue
        rel = f"plots/{ai:02d}_{slug(a.label)}.png"
        plot_attack(out / rel, f"{a.label} against victim {victim_sha[:12]} ({eval_name} test split, "
                         f"mean over {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''})", rows)
        plots.append({"attack": a.label, "path": rel})
    return plots


def _cell_rows(cells, dpoints, apoints, records, computed) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        d, a = dpoints[c["di"]], apoints[c["ai"]]
        rec = records.get(c["cell_id"])
        status = "computed" if c["cell_id"] in computed else "reused" if rec is not None else "failed"
        rows.append({"cell_id": c["cell_id"], "defense": d.label, "attack": a.label, "seed": c["seed"],
                     "status": status, "file": f"cells/{c['cell_id']}.json" if rec is not None else None,
                     "artifact": rec["artifact"] if rec is not None else None,
                     "result": rec["result"] if rec is not None else None})
    return rows


def run_grid(cfg: GridConfig, out: str | Path, backend: str = "local", workers: int | None = None) -> GridResult:
    """Run (or resume) the grid of ``cfg`` into the run folder ``out``; see the module docstring."""

    t_all = time.perf_counter()
    out = Path(out)
    workers = cfg.workers if workers is None else workers
    require(isinstance(workers, int) and workers >= 1, f"workers must be at least 1 (got {workers})")
    check_backend(backend)
    check_run_dir(out, GRID_MARKER, "edgeguard grid run")
    eval_cfg, _, _ = _victim_settings(cfg)
    dpoints, apoints = cfg.defense_points(), cfg.attack_points()
    # nothing is written before this line; cells and artifacts stay (resume)
    claim_run_dir(out, GRID_MARKER, "edgeguard grid run", stale=("grid.json", "grid.md", "plots/*.png"))

    t0 = time.perf_counter()
    bundle, victim_sha, victim_rec = _victim_bundle(cfg, out)
    t_victim = time.perf_counter() - t0

    eval_dict = eval_cfg.to_dict()
    dkeys, ids, cells, records = _plan(cfg, out, victim_sha, dpoints, apoints, eval_dict)
    pending = [c for c in cells if c["cell_id"] not in records]
    reused = len(cells) - len(pending)
    log(f"grid {cfg.name}: {len(dpoints)} defense points, {len(apoints)} attack points, {len(cfg.seeds)} seeds: "
        f"{len(cells)} cells; {reused} done already, {len(pending)} to run ({backend}, {workers} workers)")

    t0 = time.perf_counter()
    tasks = _Tasks(out, dpoints, apoints, dkeys, eval_dict, victim_sha, records)
    tasks.run(cfg.name, pending, bundle, backend, workers)
    t_tasks = time.perf_counter() - t0

    summary = summarize(dpoints, apoints, cfg.seeds, ids, records)
    plots = _plots(out, cfg, apoints, summary, victim_sha, eval_cfg.name) if records else []
    cell_rows = _cell_rows(cells, dpoints, apoints, records, tasks.computed)
    done = sum(1 for c in cell_rows if c["result"] is not None)
    report = {
        "name": cfg.name,
        "edgeguard_version": __version__,
        "grid_version": GRID_VERSION,
        "config": cfg.to_dict(),
        "backend": backend,
        "workers": workers,
        "victim": victim_rec,
        "eval": eval_dict,
        "seeds": list(cfg.seeds),
        "defense_points": [{"label": d.label, "name": d.name, "params": d.params, "config": d.full, "key": dkeys[i],
                            "artifact": f"artifacts/{dkeys[i]}/model.onnx"} for i, d in enumerate(dpoints)],
        "attack_points": [{"label": a.label, "method": a.method, "params": a.params,
                           "defenses": None if a.defenses is None else list(a.defenses)} for a in apoints],
        "counts": {"cells": len(cells), "done": done, "computed": len(tasks.computed), "reused": reused,
                   "failed": len(cells) - done},
        "computed_cells": tasks.computed,
        "cells": cell_rows,
        "summary": summary,
        "plots": plots,
        "failures": tasks.failures,
        "passed": done == len(cells) and not tasks.failures,
        "seconds": {"victim": round(t_victim, 2), "tasks": round(t_tasks, 2),
                    "export_busy": round(tasks.busy["export"], 2), "cell_busy": round(tasks.busy["cells"], 2),
                    "total": round(time.perf_counter() - t_all, 2)},
    }
    atomic_write_json(out / "grid.json", report)
    atomic_write_bytes(out / "grid.md", render_markdown(report).encode())
    log(f"grid {cfg.name}: {done}/{len(cells)} cells done (computed {len(tasks.computed)}, reused {reused}); "
        f"report {out / 'grid.md'}")
    return GridResult(str(out), report)
