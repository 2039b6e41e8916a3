"""``edgeguard evaluate grid --config configs/grid-*.yaml --out DIR``: defenses x attacks x seeds against one victim.

A grid is one victim model (an existing bundle, or trained first from ``data``/``model``/``train`` sections), a list
of output defenses and a list of extraction attacks.  Any parameter of a defense or an attack may be a list, which
sweeps it (``{name: heuristic, params: {beta: [0.5, 0.9]}}`` is two defense points; several lists give their
product).  A cell is (defense point) x (attack point) x seed; the undefended victim (``none``) is always one of the
defense points, added when the config leaves it out, because every other point is read against it.

Work, in order:

1. the victim bundle (``OUT/victim/`` when trained; reused on a rerun with the same settings);
2. one ONNX export per defense point that still has cells to run, under ``OUT/artifacts/<key>/`` where ``key``
   hashes the victim and the defense spec (a finished export is a folder with ``export.json``; reused);
3. each pending cell runs :func:`edgeguard.attacks.extraction.extract` against its defense point's ONNX file (no
   surrogate bundle is kept) and its record is written atomically to ``OUT/cells/<cell_id>.json`` as soon as it
   finishes; ``cell_id`` hashes (victim sha256, full defense config, full attack config, seed, evaluation set), so
   a rerun recomputes only the cells whose file is missing;
4. ``grid.json`` (config, cells, summary rows: mean and std over seeds per defense point x attack point),
   ``grid.md`` (one table per attack point) and ``plots/*.png`` (per attack point: defender accuracy against
   surrogate accuracy and against fidelity, one series per defense, the undefended point starred).

Backends: ``local`` runs exports and cells in a ``spawn`` process pool of ``workers`` processes (one torch thread
each); ``workers=1`` runs them in this process.  ``ray`` (``pip install 'edgeguard[dist]'``) runs the same task
functions as Ray tasks (one CPU each); the run folder must then be on storage every Ray node can read and write.
Exports and cells that fail are reported in ``grid.json`` (the run then fails, exit 1) and retried on a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import shutil
import time
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.config import Config, DataConfig, ModelConfig, config_from_dict, load_yaml, require
from edgeguard.errors import BackendUnavailable, BadInput, EdgeguardError
from edgeguard.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from edgeguard.progress import log, task
from edgeguard.training import TrainConfig

GRID_VERSION = 1
BACKENDS = ("local", "ray")
GRID_MARKER = ".edgeguard-grid"
BASELINE = "none"
METRICS = (  # (row key, ExtractionResult field, table heading)
    ("defender_accuracy", "defender_accuracy", "defender acc"),
    ("surrogate_accuracy", "surrogate_accuracy", "surrogate acc"),
    ("fidelity", "fidelity", "fidelity"),
    ("epsilon_eff", "defense_l1_mean", "ε_eff (mean L1)"),
    ("queries_used", "queries_used", "queries"),
)


# --- hashing and sweeps -------------------------------------------------------------------------------------------


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()[:n]


def _takes_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_sequence(a) for a in typing.get_args(hint) if a is not type(None))
    return hint in (list, tuple) or origin in (list, tuple)


def expand_sweep(params: Mapping[str, Any], cls: type | None, what: str) -> list[dict[str, Any]]:
    """Every point of a parameter mapping whose list values are sweeps, in the given order (their product).

    For a field that itself takes a sequence, only a list of lists is a sweep.
    """
    try:
        hints = typing.get_type_hints(cls) if cls is not None else {}
    except Exception:  # noqa: BLE001 - a config class with unresolvable hints: treat every list as a sweep
        hints = {}
    keys, axes = [], []
    for k, v in params.items():
        seq = _takes_sequence(hints.get(k))
        sweep = isinstance(v, list) and (not seq or (bool(v) and all(isinstance(e, (list, tuple)) for e in v)))
        if sweep:
            require(len(v) > 0, f"{what}: the sweep over {k!r} lists no values")
            require(len({_canon(e) for e in v}) == len(v), f"{what}: the sweep over {k!r} lists a value twice")
        keys.append(k)
        axes.append(v if sweep else [v])
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def _label(name: str, params: Mapping[str, Any]) -> str:
    return name + ("[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]" if params else "")


@dataclass(frozen=True)
class DefensePoint:
    """One defense with one value per parameter; ``full`` is its validated config (defaults filled in)."""

    name: str
    params: dict
    full: dict

    @property
    def label(self) -> str:
        from edgeguard.defenses import defense_label

        return defense_label(self.name, self.params)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.full}


@dataclass(frozen=True)
class AttackPoint:
    """One extraction method with one value per parameter (the seed comes from the grid's ``seeds``)."""

    method: str
    params: dict

    @property
    def label(self) -> str:
        return _label(self.method, self.params)

    def config(self, seed: int):
        from edgeguard.attacks.extraction import method_config

        return method_config(self.method, {**self.params, "seed": seed})


def _entry(e: Any, key: str, what: str) -> dict[str, Any]:
    if isinstance(e, str):
        e = {key: e}
    require(isinstance(e, Mapping), f"{what} must be a name or a mapping {{{key}, params}}, got {e!r:.60}")
    extra = sorted(set(e) - {key, "params"})
    require(not extra, f"{what} has an unknown key {extra[0] if extra else ''!r} (expected {key} and params)")
    require(isinstance(e.get(key), str), f"{what} needs a {key}")
    params = e.get("params") or {}
    require(isinstance(params, Mapping), f"{what}.params must be a mapping of parameters")
    return {key: e[key], "params": dict(params)}


def _prefixed(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BadInput as e:
        raise BadInput(f"{what}: {e}") from None


# --- the config ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridVictimConfig(Config):
    """The attacked model: ``bundle`` (an existing bundle folder), or ``data``/``model``/``train`` to train one."""

    bundle: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None, *, what: str | None = None) -> Config:
        raw = dict(params or {})
        where = what or "victim"
        given = [k for k in ("data", "model", "train") if isinstance(raw.get(k), Mapping)]
        if raw.get("bundle") is not None and given:
            raise BadInput(f"{where} gives both bundle and {given[0]}: name an existing bundle or the settings to train one")
        if isinstance(raw.get("train"), Mapping) and "seed" in raw["train"]:
            raise BadInput(f"{where}.train.seed: set the run's seed once, at the top level")
        return super().from_mapping(raw, what=where)

    def __post_init__(self) -> None:
        from edgeguard.bundle import is_bundle

        if self.bundle is not None:
            require(is_bundle(self.bundle), f"victim.bundle {self.bundle} is not an edgeguard bundle folder")
        else:
            from edgeguard.data import DATASETS
            from edgeguard.models import MODELS

            DATASETS.entry(self.data.name)  # unknown names fail at load, listing the known ones
            MODELS.entry(self.model.arch)


@dataclass(frozen=True)
class GridConfig(Config):
    name: str = "grid"
    seed: int = 0  # the victim's training seed (attack seeds: ``seeds``)
    victim: GridVictimConfig = field(default_factory=GridVictimConfig)
    defenses: tuple = ()  # names or {name, params}; list values sweep; ``none`` is always added
    attacks: tuple = ()  # names or {method, params}; list values sweep
    seeds: tuple[int, ...] = (0,)
    eval: DataConfig | None = None  # the evaluation set (test split); default: the victim's dataset
    workers: int = 2

    def __post_init__(self) -> None:
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**31, f"grid.seed must lie in [0, 2^31) (got {self.seed})")
        require(isinstance(self.workers, int) and self.workers >= 1, f"grid.workers must be at least 1 (got {self.workers})")
        require(len(self.seeds) > 0, "grid.seeds lists no seed")
        require(all(0 <= s < 2**31 for s in self.seeds), "grid.seeds must lie in [0, 2^31)")
        require(len(set(self.seeds)) == len(self.seeds), "grid.seeds lists a seed twice")
        require(isinstance(self.defenses, (list, tuple)), "grid.defenses must be a list")
        require(isinstance(self.attacks, (list, tuple)) and len(self.attacks) > 0, "grid.attacks must list at least one attack")
        object.__setattr__(self, "defenses",
                           tuple(_entry(d, "name", f"grid.defenses[{i}]") for i, d in enumerate(self.defenses)))
        object.__setattr__(self, "attacks",
                           tuple(_entry(a, "method", f"grid.attacks[{i}]") for i, a in enumerate(self.attacks)))
        ev = self.eval
        if isinstance(ev, str):
            ev = DataConfig(name=ev)
        elif isinstance(ev, Mapping):
            ev = DataConfig.from_mapping(ev, what="grid.eval")
        require(ev is None or isinstance(ev, DataConfig), "grid.eval must be a dataset name or {name, root, options}")
        if ev is not None:
            from edgeguard.data import DATASETS

            _prefixed("grid.eval", lambda: DATASETS.entry(ev.name))
        object.__setattr__(self, "eval", ev)
        self.defense_points()  # every name and every parameter of every point is checked here, before any work
        self.attack_points()

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> GridConfig:
        raw = load_yaml(path)
        try:
            cfg = cls.from_mapping(raw, what=f"config {path}")
        except BadInput as e:
            if str(e).startswith(f"config {path}"):
                raise
            raise BadInput(f"config {path}: {e}") from None
        return cfg.replace(**overrides)  # type: ignore[return-value]

    def defense_points(self) -> list[DefensePoint]:
        from edgeguard.defenses import DEFENSES, defense_config

        points: list[DefensePoint] = []
        for i, d in enumerate(self.defenses):
            what = f"grid.defenses[{i}] ({d['name']})"
            entry = _prefixed(what, lambda d=d: DEFENSES.entry(d["name"]))
            for p in expand_sweep(d["params"], entry.config, what):
                c = _prefixed(what, lambda d=d, p=p: defense_config(d["name"], p))
                points.append(DefensePoint(d["name"], p, c.params() if c is not None else {}))
        if not any(p.name == BASELINE for p in points):
            points.insert(0, DefensePoint(BASELINE, {}, {}))
        keys = [_canon(p.spec()) for p in points]
        dup = next((p for p, k in zip(points, keys, strict=True) if keys.count(k) > 1), None)
        require(dup is None, f"grid.defenses lists the defense point {dup.label if dup else ''} twice")
        return points

    def attack_points(self) -> list[AttackPoint]:
        from edgeguard.attacks import ATTACKS

        points: list[AttackPoint] = []
        for i, a in enumerate(self.attacks):
            what = f"grid.attacks[{i}] ({a['method']})"
            require("seed" not in a["params"], f"{what}: set attack seeds with the grid's seeds list, not params.seed")
            entry = _prefixed(what, lambda a=a: ATTACKS.entry(a["method"]))
            for p in expand_sweep(a["params"], entry.config, what):
                pt = AttackPoint(a["method"], p)
                for s in self.seeds:
                    _prefixed(what, lambda pt=pt, s=s: pt.config(s))
                points.append(pt)
        keys = [_canon(p.config(0).params()) + p.method for p in points]
        dup = next((p for p, k in zip(points, keys, strict=True) if keys.count(k) > 1), None)
        require(dup is None, f"grid.attacks lists the attack point {dup.label if dup else ''} twice")
        return points


# --- the task functions (run in a worker process, a Ray task, or in-process) ---------------------------------------


def _failure(e: BaseException) -> dict[str, Any]:
    if isinstance(e, EdgeguardError):
        return {"ok": False, "error": str(e), "error_type": type(e).__name__}
    return {"ok": False, "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__,
            "traceback": traceback.format_exc()}


def _failure_record(what: str, outcome: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rec = {"what": what, **extra, "error": outcome["error"]}
    if "traceback" in outcome:
        rec["traceback"] = outcome["traceback"]
    return rec


def _init_worker() -> None:
    """Each worker: one torch thread (the pool provides the parallelism) and no progress lines of its own."""
    os.environ["EDGEGUARD_QUIET"] = "1"
    import torch

    torch.set_num_threads(1)


def _run_export(job: dict[str, Any]) -> dict[str, Any]:
    """Export the victim with one defense point into ``job['dir']`` (built in a temp sibling, then renamed)."""
    final = Path(job["dir"])
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    t0 = time.perf_counter()
    try:
        from edgeguard.api import export_bundle

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        res = export_bundle(job["bundle"], tmp / "model.onnx", defense=job["name"], defense_params=job["params"])
        rec = res.to_json()
        rec["path"] = str(final / "model.onnx")
        if rec.get("sidecar"):
            rec["sidecar"] = str(final / Path(rec["sidecar"]).name)
        atomic_write_json(tmp / "export.json", {"key": job["key"], "defense": job["spec"], "export": rec})
        if final.exists():  # an unfinished folder of an interrupted run (no export.json)
            shutil.rmtree(final)
        os.replace(tmp, final)
        return {"ok": True, "export": rec, "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001 - reported per defense point, the grid goes on
        shutil.rmtree(tmp, ignore_errors=True)
        return _failure(e)


def _run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """One extraction attack against one defended artifact; returns the result dict (never raises)."""
    t0 = time.perf_counter()
    try:
        from edgeguard.attacks.extraction import extract, method_config

        cfg = method_config(job["method"], job["config"])
        eval_data = config_from_dict(job["eval"])
        res = extract(job["artifact"], None, job["method"], cfg, eval_data=eval_data, quiet=True)  # type: ignore[arg-type]
        return {"ok": True, "result": res.to_json(), "seconds": round(time.perf_counter() - t0, 2), "pid": os.getpid()}
    except Exception as e:  # noqa: BLE001 - reported per cell, the grid goes on
        return _failure(e)


def _ray_entry(fn: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    _init_worker()
    return fn(job)


# --- backends -------------------------------------------------------------------------------------------------------


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BadInput(f"unknown grid backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "ray":
        try:
            importlib.import_module("ray")
        except ImportError:
            raise BackendUnavailable("the ray backend needs ray: pip install 'edgeguard[dist]'") from None


Job = dict[str, Any]
TaskFn = Callable[[Job], dict[str, Any]]


class _Executor:
    """Runs task functions and hands back ``(fn, job, outcome)`` as each finishes; one pool for the whole grid.

    ``local`` with one worker runs the tasks here, in submission order, with the workers' single torch thread
    (the same numbers as a pool); more workers: a ``spawn`` process pool; ``ray``: Ray tasks of one CPU each.
    """

    def __init__(self, backend: str, workers: int):
        self.backend, self.workers = backend, workers
        self._pending: dict[Any, tuple[TaskFn, Job]] = {}
        self._queue: list[tuple[TaskFn, Job]] = []
        self._pool: Any = None
        self._ray: Any = None
        self._remote: Any = None
        if backend == "ray":
            self._ray = importlib.import_module("ray")
            if not self._ray.is_initialized():
                self._ray.init(ignore_reinit_error=True, log_to_driver=False)  # RAY_ADDRESS selects a running cluster
            self._remote = self._ray.remote(num_cpus=1)(_ray_entry)
        elif workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)

    def __len__(self) -> int:
        return len(self._pending) + len(self._queue)

    def submit(self, fn: TaskFn, job: Job) -> None:
        if self._ray is not None:
            self._pending[self._remote.remote(fn, job)] = (fn, job)
        elif self._pool is not None:
            self._pending[self._pool.submit(fn, job)] = (fn, job)
        else:
            self._queue.append((fn, job))

    def next_done(self) -> tuple[TaskFn, Job, dict[str, Any]]:
        if self._queue:
            fn, job = self._queue.pop(0)
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn, job, fn(job)
            finally:
                torch.set_num_threads(threads)
        if self._ray is not None:
            done, _ = self._ray.wait(list(self._pending), num_returns=1)
            handle, get = done[0], self._ray.get
        else:
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(list(self._pending), return_when=FIRST_COMPLETED)
            handle = next(f for f in self._pending if f in done)  # the earliest submitted of those done

            def get(f: Any) -> Any:
                return f.result()

        fn, job = self._pending.pop(handle)
        try:
            outcome = get(handle)
        except Exception as e:  # noqa: BLE001 - a worker, task or node died (out of memory, killed)
            outcome = _failure(e)
        return fn, job, outcome

    def close(self, *, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._ray is not None and cancel:
            for ref in self._pending:
                try:
                    self._ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass


# --- the run folder and the victim ----------------------------------------------------------------------------------


def _check_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / GRID_MARKER).exists():
        raise BadInput(f"refusing to write into {out}: it holds files that are not an edgeguard grid run (choose another --out)")


def _prepare_run_dir(out: Path) -> None:
    """New, empty or an earlier grid's folder; stale reports and plots go first, cells and artifacts stay (resume)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / GRID_MARKER).write_text("edgeguard grid run folder\n")
    for stale in ("grid.json", "grid.md"):
        (out / stale).unlink(missing_ok=True)
    for png in (out / "plots").glob("*.png") if (out / "plots").is_dir() else ():
        png.unlink(missing_ok=True)


def _victim_settings(cfg: GridConfig) -> tuple[DataConfig, tuple[int, ...], int]:
    """The evaluation set and the victim's input shape and class count, without training anything."""
    from edgeguard.api import load_data

    v = cfg.victim
    if v.bundle is not None:
        from edgeguard.bundle import load_bundle
        from edgeguard.protect.watermark import bundle_data_config

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
    from edgeguard.api import train_bundle
    from edgeguard.bundle import is_bundle, load_bundle

    v = cfg.victim
    if v.bundle is not None:
        b = load_bundle(v.bundle)  # verifies every file against the manifest
        return Path(v.bundle), b.sha256, {"bundle": str(v.bundle), "sha256": b.sha256, "trained": False}
    train = dataclasses.replace(v.train, seed=cfg.seed)
    key = _hash({"data": v.data.to_dict(), "model": v.model.to_dict(), "train": train.to_dict()})
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


# --- summary, report, plots ---------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": round(mean, 6), "std": None if std is None else round(std, 6), "n": n}


def _summary(dpoints: list[DefensePoint], apoints: list[AttackPoint], seeds: tuple[int, ...],
             ids: dict[tuple[int, int, int], str], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ai, a in enumerate(apoints):
        block = []
        for di, d in enumerate(dpoints):
            results = [records[ids[di, ai, s]]["result"] for s in seeds if ids[di, ai, s] in records]
            row: dict[str, Any] = {"attack": a.label, "method": a.method, "attack_params": a.params, "defense": d.label,
                                   "defense_name": d.name, "defense_params": d.params, "undefended": d.name == BASELINE,
                                   "seeds": len(results)}
            for key, src, _ in METRICS:
                row[key] = _mean_std([float(r[src]) for r in results if r.get(src) is not None])
            block.append(row)
        base = next(r for r in block if r["undefended"])
        for row in block:
            row["delta_vs_undefended"] = {
                k: (None if row[k]["mean"] is None or base[k]["mean"] is None else round(row[k]["mean"] - base[k]["mean"], 6))
                for k in ("defender_accuracy", "surrogate_accuracy", "fidelity")}
        rows += block
    return rows


def _fmt(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "-"
    if digits == 0:
        return f"{stat['mean']:.0f}" + (f" ± {stat['std']:.0f}" if stat["std"] is not None else "")
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _delta(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}"


def summary_tables(rows: list[dict[str, Any]]) -> str:
    """One markdown table per attack point (mean ± std over seeds; Δ against the undefended row)."""
    from edgeguard.evaluate.report import _table

    out = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        block = [r for r in rows if r["attack"] == attack]
        out += [f"### {attack}", ""]
        body = [[r["defense"] + (" (undefended)" if r["undefended"] else ""), r["seeds"],
                 *[_fmt(r[k], 0 if k == "queries_used" else 4) for k, _, _ in METRICS],
                 _delta(r["delta_vs_undefended"]["surrogate_accuracy"]), _delta(r["delta_vs_undefended"]["fidelity"]),
                 _delta(r["delta_vs_undefended"]["defender_accuracy"])] for r in block]
        head = ["defense", "seeds", *[h for _, _, h in METRICS], "Δ surrogate acc", "Δ fidelity", "Δ defender acc"]
        out += [_table(head, body, "lr" + "r" * (len(head) - 2)), ""]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    v, counts = report["victim"], report["counts"]
    ev = report["eval"]["params"]
    out = [f"# edgeguard grid: {report['name']}", ""]
    out += [
        f"- verdict: **{'PASS' if report['passed'] else 'FAIL'}** ({counts['done']}/{counts['cells']} cells done; "
        f"computed {counts['computed']}, reused {counts['reused']}, failed {counts['failed']})",
        f"- victim: `{v['bundle']}` (sha256 {v['sha256'][:12]}{', trained by this grid' if v.get('trained') else ''})",
        f"- evaluation set: {ev['name']} test split; attack seeds {', '.join(map(str, report['seeds']))}",
        f"- backend {report['backend']}, {report['workers']} workers; total time {report['seconds']['total']:.1f} s "
        f"(victim {report['seconds']['victim']:.1f} s, exports and cells {report['seconds']['tasks']:.1f} s; "
        f"busy time in the workers: exports {report['seconds']['export_busy']:.1f} s, cells {report['seconds']['cell_busy']:.1f} s)",
        "",
        "Surrogate acc: the attacker's model on the test split; fidelity: its top-1 agreement with the defended victim; "
        "defender acc: the victim through its defense on the same split; ε_eff: the defense's mean L1 over the "
        "attacker's queries; Δ: against the undefended row of the same attack.  Mean ± std over seeds.",
        "",
        "## Results",
        "",
        summary_tables(report["summary"]),
    ]
    if report["plots"]:
        out += ["## Plots", ""] + [f"![{p['attack']}]({p['path']})" for p in report["plots"]] + [""]
    if report["failures"]:
        out += ["## Failures (retried on a rerun)", ""]
        out += [f"- {f['what']}: {f['error']}" for f in report["failures"]] + [""]
    return "\n".join(out) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.=-]+", "_", text.lower()).strip("_")[:80] or "attack"


def _plot(path: Path, title: str, rows: list[dict[str, Any]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    rows = [r for r in rows if r["defender_accuracy"]["mean"] is not None]
    base = next((r for r in rows if r["undefended"]), None)
    names = list(dict.fromkeys(r["defense_name"] for r in rows if not r["undefended"]))
    markers = "osD^v<>pPhX"
    for ax, key, ylabel in zip(axes, ("surrogate_accuracy", "fidelity"),
                               ("attacker accuracy (surrogate, test split)", "fidelity (top-1 agreement with the victim)"),
                               strict=True):
        for i, name in enumerate(names):
            pts = [r for r in rows if r["defense_name"] == name and r[key]["mean"] is not None]
            xs = [r["defender_accuracy"]["mean"] for r in pts]
            ys = [r[key]["mean"] for r in pts]
            xe = [r["defender_accuracy"]["std"] or 0.0 for r in pts]
            ye = [r[key]["std"] or 0.0 for r in pts]
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none",
                        capsize=2, label=name, alpha=0.85)
            for r, x, y in zip(pts, xs, ys, strict=True):
                if r["defense_params"]:
                    ax.annotate(",".join(f"{k}={v}" for k, v in r["defense_params"].items()), (x, y), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        if base is not None and base[key]["mean"] is not None:
            ax.scatter([base["defender_accuracy"]["mean"]], [base[key]["mean"]], marker="*", s=320, facecolors="none",
                       edgecolors="black", linewidths=1.6, zorder=5, label="undefended")  # hollow: points under it show
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, min(hi, 1.01))  # accuracies: no room past 1
        ax.set_xlabel("defender accuracy (victim through its defense)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridResult:
    out: str
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.report["summary"]

    def table(self) -> str:
        return summary_tables(self.rows)

    def to_json(self) -> dict[str, Any]:
        return self.report


def _read_cell(path: Path, cell_id: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("cell_id") == cell_id and isinstance(rec.get("result"), dict)
    return rec if ok else None


def run_grid(cfg: GridConfig, out: str | Path, backend: str = "local", workers: int | None = None) -> GridResult:
    """Run (or resume) the grid of ``cfg`` into the run folder ``out``; see the module docstring."""
    from edgeguard import __version__

    t_all = time.perf_counter()
    out = Path(out)
    workers = cfg.workers if workers is None else workers
    require(isinstance(workers, int) and workers >= 1, f"workers must be at least 1 (got {workers})")
    _check_backend(backend)
    _check_run_dir(out)
    eval_cfg, _, _ = _victim_settings(cfg)
    dpoints, apoints = cfg.defense_points(), cfg.attack_points()
    _prepare_run_dir(out)  # nothing is written before this line

    t0 = time.perf_counter()
    bundle, victim_sha, victim_rec = _victim_bundle(cfg, out)
    t_victim = time.perf_counter() - t0

    # the plan: every cell's id, and which cells still have to run
    eval_dict = eval_cfg.to_dict()
    dkeys = [_hash({"victim": victim_sha, "defense": d.spec()}) for d in dpoints]
    ids: dict[tuple[int, int, int], str] = {}
    cells: list[dict[str, Any]] = []
    records: dict[str, dict[str, Any]] = {}
    for di, d in enumerate(dpoints):
        for ai, a in enumerate(apoints):
            for s in cfg.seeds:
                attack_cfg = a.config(s).params()
                cid = _hash({"victim": victim_sha, "defense": d.spec(), "method": a.method, "attack": attack_cfg,
                             "seed": s, "eval": eval_dict, "grid_version": GRID_VERSION}, 20)
                ids[di, ai, s] = cid
                cells.append({"cell_id": cid, "di": di, "ai": ai, "seed": s, "method": a.method, "config": attack_cfg})
                rec = _read_cell(out / "cells" / f"{cid}.json", cid)
                if rec is not None:
                    records[cid] = rec
    pending = [c for c in cells if c["cell_id"] not in records]
    reused = len(cells) - len(pending)
    log(f"grid {cfg.name}: {len(dpoints)} defense points x {len(apoints)} attack points x {len(cfg.seeds)} seeds = "
        f"{len(cells)} cells; {reused} done already, {len(pending)} to run ({backend}, {workers} workers)")

    # exports (one per defense point that still has cells to run, unless cached) and cells, in one pool: a cell is
    # submitted as soon as its defense point's artifact exists
    failures: list[dict[str, Any]] = []
    ready: set[int] = set()
    export_jobs: list[Job] = []
    for di in sorted({c["di"] for c in pending}):
        folder = out / "artifacts" / dkeys[di]
        if (folder / "export.json").is_file() and (folder / "model.onnx").is_file():
            ready.add(di)
        else:
            d = dpoints[di]
            export_jobs.append({"di": di, "key": dkeys[di], "dir": str(folder), "bundle": str(bundle), "name": d.name,
                                "params": d.params, "spec": d.spec()})
    computed: list[str] = []
    export_fn, cell_fn = _run_export, _run_cell  # looked up at call time (tests count the calls)
    busy = {"export": 0.0, "cells": 0.0}

    def cell_job(c: Job) -> Job:
        return {**c, "artifact": str(out / "artifacts" / dkeys[c["di"]] / "model.onnx"), "eval": eval_dict}

    def record(job: Job, outcome: dict[str, Any]) -> str:
        d, a = dpoints[job["di"]], apoints[job["ai"]]
        what = f"{d.label} x {a.label} seed {job['seed']}"
        if not outcome["ok"]:
            failures.append(_failure_record(f"cell {job['cell_id']} ({what})", outcome, cell_id=job["cell_id"]))
            return f"{what}: FAILED: {outcome['error']}"
        rec = {"cell_id": job["cell_id"], "grid_version": GRID_VERSION, "victim_sha256": victim_sha,
               "defense": {"name": d.name, "params": d.params, "label": d.label, "config": d.full, "key": dkeys[job["di"]]},
               "attack": {"method": a.method, "params": a.params, "label": a.label, "config": job["config"]},
               "seed": job["seed"], "eval": eval_dict, "artifact": f"artifacts/{dkeys[job['di']]}/model.onnx",
               "result": outcome["result"], "seconds": outcome["seconds"],
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(out / "cells" / f"{job['cell_id']}.json", rec)  # as soon as it finishes: resumable
        records[job["cell_id"]] = rec
        computed.append(job["cell_id"])
        busy["cells"] += outcome["seconds"]
        r = outcome["result"]
        return (f"{what}: surrogate acc {r['surrogate_accuracy']:.4f}, fidelity {r['fidelity']:.4f}, "
                f"defender acc {r['defender_accuracy']:.4f} ({outcome['seconds']:.0f} s)")

    t0 = time.perf_counter()
    if export_jobs or pending:
        if export_jobs:
            log(f"== exporting {len(export_jobs)} defended artifacts, then {len(pending)} cells")
            (out / "artifacts").mkdir(parents=True, exist_ok=True)
        ex = _Executor(backend, workers)
        try:
            for job in export_jobs:
                ex.submit(export_fn, job)
            for c in pending:
                if c["di"] in ready:
                    ex.submit(cell_fn, cell_job(c))
            with task(f"grid {cfg.name}", total=len(pending)) as bar:
                while len(ex):
                    fn, job, outcome = ex.next_done()
                    if "cell_id" in job:
                        bar.advance(1)
                        bar.note(record(job, outcome))
                        continue
                    label = dpoints[job["di"]].label
                    if outcome["ok"]:
                        log(f"exported {label} ({outcome['seconds']:.0f} s)")
                        busy["export"] += outcome["seconds"]
                        for c in pending:
                            if c["di"] == job["di"]:
                                ex.submit(cell_fn, cell_job(c))
                    else:
                        failures.append(_failure_record(f"export {label}", outcome))
                        n = sum(1 for c in pending if c["di"] == job["di"])
                        bar.advance(n)
                        bar.note(f"export {label} FAILED ({n} cells not run): {outcome['error']}")
        except BaseException:
            ex.close(cancel=True)
            raise
        ex.close()
    t_tasks = time.perf_counter() - t0

    # the report
    summary = _summary(dpoints, apoints, cfg.seeds, ids, records)
    plots = []
    if records:
        (out / "plots").mkdir(exist_ok=True)
        for ai, a in enumerate(apoints):
            rows = [r for r in summary if r["attack"] == a.label]
            if not any(r["seeds"] for r in rows):
                continue
            rel = f"plots/{ai:02d}_{_slug(a.label)}.png"
            _plot(out / rel, f"{a.label} against victim {victim_sha[:12]} ({eval_cfg.name} test split, "
                             f"mean over {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''})", rows)
            plots.append({"attack": a.label, "path": rel})
    cell_rows = []
    for c in cells:
        d, a = dpoints[c["di"]], apoints[c["ai"]]
        rec = records.get(c["cell_id"])
        status = "computed" if c["cell_id"] in computed else "reused" if rec is not None else "failed"
        cell_rows.append({"cell_id": c["cell_id"], "defense": d.label, "attack": a.label, "seed": c["seed"],
                          "status": status, "file": f"cells/{c['cell_id']}.json" if rec is not None else None,
                          "artifact": rec["artifact"] if rec is not None else None,
                          "result": rec["result"] if rec is not None else None})
    done = sum(1 for c in cell_rows if c["result"] is not None)
    counts = {"cells": len(cells), "done": done, "computed": len(computed), "reused": reused,
              "failed": len(cells) - done}
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
        "attack_points": [{"label": a.label, "method": a.method, "params": a.params} for a in apoints],
        "counts": counts,
        "computed_cells": computed,
        "cells": cell_rows,
        "summary": summary,
        "plots": plots,
        "failures": failures,
        "passed": done == len(cells) and not failures,
        "seconds": {"victim": round(t_victim, 2), "tasks": round(t_tasks, 2), "export_busy": round(busy["export"], 2),
                    "cell_busy": round(busy["cells"], 2),
                    "total": round(time.perf_counter() - t_all, 2)},
    }
    atomic_write_json(out / "grid.json", report)
    atomic_write_bytes(out / "grid.md", render_markdown(report).encode())
    log(f"grid {cfg.name}: {done}/{len(cells)} cells done (computed {len(computed)}, reused {reused}); "
        f"report {out / 'grid.md'}")
    return GridResult(str(out), report)


__all__ = ["AttackPoint", "DefensePoint", "GridConfig", "GridResult", "GridVictimConfig", "expand_sweep", "run_grid",
           "summary_tables"]
