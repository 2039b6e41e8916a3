"""Enrolment of a trigger set on one artifact (its own labels, log-probabilities and noise floor) and exact
verification against that record."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.config import Config, require
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.protect.fragile.generator import FragileKey
from edgeguard.results import Result

RECORD_FORMAT = "edgeguard-fragile"


@dataclass(frozen=True)
class EnrolConfig(Config):
    repeats: int = 10
    batch_sizes: tuple[int, ...] = (1, 100)
    min_kept: float = 0.9  # share of triggers that must survive the stability and margin filters

    def __post_init__(self) -> None:
        require(self.repeats >= 1 and len(self.batch_sizes) >= 1 and all(int(b) >= 1 for b in self.batch_sizes),
                "enrolment needs repeats >= 1 and batch sizes >= 1")
        require(0 < self.min_kept <= 1, "min_kept must lie in (0, 1]")


def _tau(precision: str) -> float:
    return 1e-3 if precision == "fp32" else 1e-2


def _eps(precision: str) -> float:
    return 1e-5 if precision == "fp32" else 1e-3


def _logp(runner, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    p = runner.predict(x, batch_size=batch_size) if batch_size else runner.predict(x)
    return np.log(np.clip(p.astype(np.float64), 1e-30, None))


def _numerics(info) -> dict[str, Any]:
    """What makes two runs of the same weights compute different numbers: backend, precision, device."""
    return {"backend": info.backend, "precision": info.precision, "device": info.device}


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TooFewStable(CheckFailed):
    """Enrolment kept too few triggers; ``dropped`` are the indices it left out (unstable or within the floor)."""

    def __init__(self, message: str, dropped: list[int]):
        super().__init__(message)
        self.dropped = dropped


def enrol(runner, key: FragileKey, cfg: EnrolConfig | None = None, *, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's reference record: fingerprint, kept triggers, their labels and log-probabilities, noise floor.

    The record carries ``record_sha256`` over its own content, so an edited record is refused at verification."""
    cfg = cfg or EnrolConfig()
    info = runner.info
    x = key.images.numpy()
    runs = np.stack([_logp(runner, x, b) for b in cfg.batch_sizes for _ in range(cfg.repeats)])
    med = np.median(runs, axis=0)
    delta = float(np.abs(runs - med).max())
    labels = runs.argmax(2)
    stable = (labels == labels[0]).all(0)
    top2 = np.sort(med, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    floor = max(4 * delta, _tau(info.precision))
    kept = np.flatnonzero(stable & (margin >= floor))
    if len(kept) < math.ceil(cfg.min_kept * len(x)):
        raise TooFewStable(f"only {len(kept)}/{len(x)} triggers are stable with a margin >= {floor:.2g} on {info.path} "
                           f"(need {cfg.min_kept:.0%}); regenerate with a smaller --margin or more triggers. Nothing was "
                           "written", sorted(set(range(len(x))) - set(kept.tolist())))
    ref = med.argmax(1)
    record = {
        "format": RECORD_FORMAT,
        "version": 1,
        "fingerprint": {"sha256": info.sha256, **_numerics(info), "defense": info.defense,
                        "classes": list(info.classes), "input_shape": list(info.input_shape), "path": info.path},
        "trigger_sha256": key.sha256,
        "n": len(x),
        "kept": kept.tolist(),
        "reference_labels": ref[kept].tolist(),
        "reference_logprobs": med[kept].round(7).tolist(),
        "key_agreement": round(float((ref[kept] == key.key.numpy()[kept]).mean()), 6),
        "noise": delta,
        "margin_floor": floor,
        "margin_min": float(margin[kept].min()),
        "margin_median": float(np.median(margin[kept])),
        "tolerance": 3 * delta + _eps(info.precision),
        "enrol": cfg.params(),
        "generation": generation or dict(key.stats),
    }
    record["record_sha256"] = record_hash(record)
    return record


@dataclass(frozen=True)
class FragileVerification(Result):
    artifact: dict[str, Any]
    verdict: str  # intact | modified | drift
    hash_matches: bool
    acc_tri: float  # against the enrolled reference labels, on the kept triggers
    acc_tri_key: float  # against the stored key: i mod M, bar any rekeyed triggers (information)
    kept: int
    flipped: tuple[int, ...]  # trigger indices whose label changed
    max_deviation: float  # max |log p - reference| over kept triggers
    tolerance: float
    enrolled: dict[str, Any]  # the fingerprint of the enrolment compared against
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "intact"

    def summary(self) -> str:
        first = f"{self.note}; " if self.note else ""
        flips = (f", flipped triggers {list(self.flipped[:10])}{' ...' if len(self.flipped) > 10 else ''}"
                 if self.flipped else "")
        return (f"fragile {self.verdict.upper()}: {first}AccTri {self.acc_tri:.3f} on {self.kept} enrolled triggers{flips}, "
                f"max |Δlog p| {self.max_deviation:.2g} (tolerance {self.tolerance:.2g})")

def check_record(record: Any, where: str = "the fragile enrolment") -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise BadInput(f"{where} is not an edgeguard fragile record")
    if record.get("record_sha256") != record_hash(record):
        raise BadInput(f"{where} was edited after enrolment (its record hash does not match); refusing to use it")
    return record


def verify(runner, record: dict[str, Any], key: FragileKey) -> FragileVerification:
    """Run the kept triggers on ``runner`` and compare with ``record`` (labels exactly, log-probabilities within the
    enrolled tolerance).  A different file hash is reported first (and is a modification); a record enrolled on other
    numerics (backend, precision or device) gives ``drift``, never ``modified``."""
    check_record(record)
    if key.sha256 != record["trigger_sha256"]:
        raise BadInput("the fragile triggers do not match the enrolment record (sha256); the vault was modified")
    info = runner.info
    fp = record["fingerprint"]
    if list(info.classes) != fp["classes"] or [d for d in info.input_shape if d] != [d for d in fp["input_shape"] if d]:
        raise BadInput(f"{info.path} is a {info.num_classes}-class model taking {list(info.input_shape)}; the fragile "
                       f"enrolment is for a {len(fp['classes'])}-class model taking {fp['input_shape']}")
    kept = np.asarray(record["kept"], dtype=np.int64)
    runner.expect(len(kept))
    logp = _logp(runner, key.images.numpy()[kept])
    ref = np.asarray(record["reference_labels"])
    got = logp.argmax(1)
    flipped = tuple(int(i) for i in kept[got != ref])
    dev = float(np.abs(logp - np.asarray(record["reference_logprobs"])).max())
    same_hash = info.sha256 == fp["sha256"]
    same_numerics = _numerics(info) == {k: fp[k] for k in ("backend", "precision", "device")}
    changed = bool(flipped) or dev > record["tolerance"]
    notes = []
    if not same_hash:
        notes.append(f"the artifact's sha256 {info.sha256[:12]} differs from the enrolled {fp['sha256'][:12]}")
    if not same_numerics:
        verdict = "drift"
        notes.append(f"enrolled on {fp['backend']} {fp['precision']} ({fp['device']}), run on {info.backend} "
                     f"{info.precision} ({info.device}): differences are deployment drift, not evidence of tampering; "
                     "enrol this artifact to check its integrity")
    elif not same_hash or changed:
        verdict = "modified"
        if not same_hash and not changed:
            notes.append("no enrolled trigger changed: the edit does not show in the outputs (metadata, or below the "
                         "artifact's precision)")
        elif same_hash:
            notes.append("the file is the enrolled one but its outputs changed: the runtime or its environment changed")
    else:
        verdict = "intact"
    key_labels = key.key.numpy()[kept]
    return FragileVerification(info.to_json(), verdict, same_hash, round(1 - len(flipped) / len(kept), 6),
                               round(float((got == key_labels).mean()), 6), len(kept), flipped, dev,
                               record["tolerance"], {k: fp[k] for k in ("sha256", "backend", "precision", "device", "path")},
                               "; ".join(notes))

