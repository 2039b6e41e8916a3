"""Grid configuration: the victim, sweeps of defense and attack parameters, and the hashes that name cells."""

from __future__ import annotations

import hashlib
import itertools
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.attacks import ATTACKS
from edgeguard.attacks.extraction import method_config
from edgeguard.bundle import is_bundle
from edgeguard.config import Config, DataConfig, ModelConfig, load_yaml, require
from edgeguard.data import DATASETS
from edgeguard.defenses import DEFENSES, defense_config, defense_label
from edgeguard.errors import BadInput
from edgeguard.models import MODELS
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


def short_hash(obj: Any, n: int = 16) -> str:
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
        return defense_label(self.name, self.params)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.full}


@dataclass(frozen=True)
class AttackPoint:
    """One extraction method with one value per parameter (the seed comes from the grid's ``seeds``)."""

    method: str
    params: dict
    defenses: tuple[str, ...] | None = None  # the defense names this attack runs against (None: all of them)

    @property
    def label(self) -> str:
        return _label(self.method, self.params)

    def meets(self, defense: DefensePoint) -> bool:
        return self.defenses is None or defense.name in self.defenses

    def config(self, seed: int):
        return method_config(self.method, {**self.params, "seed": seed})


def _entry(e: Any, key: str, what: str, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    if isinstance(e, str):
        e = {key: e}
    require(isinstance(e, Mapping), f"{what} must be a name or a mapping {{{key}, params}}, got {e!r:.60}")
    allowed = (key, "params", *extra_keys)
    extra = sorted(set(e) - set(allowed))
    require(not extra, f"{what} has an unknown key {extra[0] if extra else ''!r} (expected {', '.join(allowed)})")
    require(isinstance(e.get(key), str), f"{what} needs a {key}")
    params = e.get("params") or {}
    require(isinstance(params, Mapping), f"{what}.params must be a mapping of parameters")
    out = {key: e[key], "params": dict(params)}
    for k in extra_keys:
        if e.get(k) is not None:
            out[k] = e[k]
    return out


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
        if self.bundle is not None:
            require(is_bundle(self.bundle), f"victim.bundle {self.bundle} is not an edgeguard bundle folder")
        else:
            DATASETS.entry(self.data.name)  # unknown names fail at load, listing the known ones
            MODELS.entry(self.model.arch)


@dataclass(frozen=True)
class GridConfig(Config):
    name: str = "grid"
    seed: int = 0  # the victim's training seed (attack seeds: ``seeds``)
    victim: GridVictimConfig = field(default_factory=GridVictimConfig)
    defenses: tuple = ()  # names or {name, params}; list values sweep; ``none`` is always added
    attacks: tuple = ()  # names or {method, params, defenses}; list values sweep; defenses: only these (and none)
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
                           tuple(_entry(a, "method", f"grid.attacks[{i}]", ("defenses",)) for i, a in enumerate(self.attacks)))
        ev = self.eval
        if isinstance(ev, str):
            ev = DataConfig(name=ev)
        elif isinstance(ev, Mapping):
            ev = DataConfig.from_mapping(ev, what="grid.eval")
        require(ev is None or isinstance(ev, DataConfig), "grid.eval must be a dataset name or {name, root, options}")
        if ev is not None:
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
        points: list[AttackPoint] = []
        for i, a in enumerate(self.attacks):
            what = f"grid.attacks[{i}] ({a['method']})"
            require("seed" not in a["params"], f"{what}: set attack seeds with the grid's seeds list, not params.seed")
            entry = _prefixed(what, lambda a=a: ATTACKS.entry(a["method"]))
            only = a.get("defenses")
            if only is not None:
                require(isinstance(only, (list, tuple)) and all(isinstance(n, str) for n in only),
                        f"{what}: defenses must be a list of defense names")
                known = {d.name for d in self.defense_points()}
                bad = [n for n in only if n not in known]
                require(not bad, f"{what}: defenses names {bad[0] if bad else ''!r}, which grid.defenses does not list "
                                 f"(listed: {', '.join(sorted(known))})")
                only = tuple(dict.fromkeys([BASELINE, *only]))  # every attack runs against no defense: the baseline
            for p in expand_sweep(a["params"], entry.config, what):
                pt = AttackPoint(a["method"], p, only)
                for s in self.seeds:
                    _prefixed(what, lambda pt=pt, s=s: pt.config(s))
                points.append(pt)
        keys = [_canon(p.config(0).params()) + p.method for p in points]
        dup = next((p for p, k in zip(points, keys, strict=True) if keys.count(k) > 1), None)
        require(dup is None, f"grid.attacks lists the attack point {dup.label if dup else ''} twice")
        return points
