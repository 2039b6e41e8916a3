"""``extract(artifact, out, method, cfg)``: run one extraction attack against a deployed artifact and measure it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import ExtractionConfig, ExtractionContext, QueryOracle
from edgeguard.bundle import ModelSpec, check_target, save_bundle, stage_record
from edgeguard.config import DataConfig
from edgeguard.data import load_data
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.models import create_model
from edgeguard.results import Result
from edgeguard.runtime import artifact_kind, open_runner


@dataclass(frozen=True)
class ExtractionResult(Result):
    method: str
    artifact: str
    defense: str
    budget: int
    queries_used: int
    surrogate_accuracy: float  # on the victim's test split
    fidelity: float | None  # argmax agreement of the surrogate with the (defended) victim on the test split
    defender_accuracy: float | None  # the victim's own accuracy through its defense on the same split
    defense_l1_mean: float | None  # mean L1 of the defense over the attacker's queries (None: no undefended view)
    eval_dataset: str
    seconds: float
    surrogate_bundle: str | None = None
    details: dict[str, Any] | None = None
    server: dict[str, Any] | None = None  # a served victim: Triton's own row count for the attack, and the reference
    passed: bool = True
    # where the seconds went: setup (data, pool, runners), queries (answering the attack), attack (the attack's own
    # work: surrogate training, synthesis), evaluation (accuracy and fidelity on the test split)
    timings: dict[str, float] | None = None

    def summary(self) -> str:
        l1 = f", defense L1 {self.defense_l1_mean:.4f}" if self.defense_l1_mean is not None else ""
        if self.fidelity is None:
            fid = "fidelity not measured (a served victim: pass --reference with the file it serves)"
        else:
            fid = f"fidelity {self.fidelity:.4f}, defender accuracy {self.defender_accuracy:.4f}"
        srv = ""
        if self.server is not None and self.server.get("inference_rows") is not None:
            srv = f"; the server counted {self.server['inference_rows']} rows"
        return (f"{self.method} against {self.artifact} (defense {self.defense}): {self.queries_used}/{self.budget} "
                f"queries{srv}; surrogate accuracy {self.surrogate_accuracy:.4f}, {fid}{l1}; "
                f"surrogate bundle {self.surrogate_bundle}")

def method_config(method: str, params: dict[str, Any] | None = None) -> ExtractionConfig:
    entry = ATTACKS.entry(method)
    if entry.meta.get("family") != "extraction":
        known = ", ".join(ATTACKS.names(family="extraction"))
        raise BadInput(f"{method!r} is not an extraction attack; known: {known}")
    return ATTACKS.config_from(method, dict(params or {}))


def _pool(cfg: ExtractionConfig, input_shape) -> Any:
    options = dict(cfg.query_options)
    if cfg.query_set == "synthetic":  # procedural images: shape them like the victim's input unless told otherwise
        c, h, _ = input_shape
        options.setdefault("size", int(h))
        options.setdefault("channels", int(c))
        options.setdefault("n", max(2000, cfg.budget))
        options.setdefault("seed", 101)
    pool = load_data(DataConfig(cfg.query_set, root=cfg.query_root, options=options), "train")
    if tuple(pool.info.input_shape) != tuple(input_shape):
        raise BadInput(f"the query set {cfg.query_set!r} has images {tuple(pool.info.input_shape)}, but the victim takes "
                       f"{tuple(input_shape)}")
    return pool


def _accuracy_and_fidelity(surrogate: torch.nn.Module, victim, test) -> tuple[float, float, float]:
    x, y = test.tensors()
    with torch.no_grad():
        s = torch.cat([surrogate(x[i : i + 512]) for i in range(0, len(x), 512)]).argmax(1).numpy()
    v = victim.predict(x.numpy()).argmax(1)
    y = y.numpy()
    return float((s == y).mean()), float((s == v).mean()), float((v == y).mean())


def _accuracy_only(surrogate, test) -> float:
    x, y = test.tensors()
    with torch.no_grad():
        s = torch.cat([surrogate(x[i : i + 512]) for i in range(0, len(x), 512)]).argmax(1).numpy()
    return float((s == y.numpy()).mean())


def _pool_and_norm(cfg: ExtractionConfig, method: str, info):
    """The attacker's query pool (None for data-free methods) and the surrogate's input normalisation, from the
    pool's own statistics (the attacker knows its data, not the victim's)."""
    pool = _pool(cfg, info.input_shape) if ATTACKS.entry(method).meta.get("needs_pool", True) else None
    if pool is not None:
        x0 = pool.tensors(0, min(len(pool), 2048))[0]
        mean = tuple(float(v) for v in x0.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in x0.std(dim=(0, 2, 3)))
    else:
        mean, std = (0.5,) * info.input_shape[0], (0.5,) * info.input_shape[0]

    return pool, mean, std


def _evaluate(victim, surrogate, test, before, remote: bool, artifact, reference):
    """(surrogate accuracy, fidelity, defender accuracy, server counters).  A served victim is compared through
    ``reference`` (the local file it serves), else only the surrogate's accuracy is measured."""
    info, server = victim.info, None
    if remote:
        after = victim.server_statistics()
        rows = None if before is None or after is None else after["inference_count"] - before["inference_count"]
        server = {"inference_rows": rows, "rows_sent": victim.rows_sent, "requests": victim.requests,
                  "retried": victim.retried, "reference": str(reference) if reference is not None else None}
        if reference is None:
            acc, fid, defender = _accuracy_only(surrogate, test), None, None
        else:
            with open_runner(reference) as ref:
                if info.sha256 and ref.info.sha256 != info.sha256:
                    raise BadInput(f"--reference {reference} is not the artifact {artifact} serves (sha256 "
                                   f"{ref.info.sha256[:12]} vs {info.sha256[:12]})")
                acc, fid, defender = _accuracy_and_fidelity(surrogate, ref, test)
    else:
        acc, fid, defender = _accuracy_and_fidelity(surrogate, victim, test)
    return acc, fid, defender, server


def _save_surrogate(out, surrogate, result: ExtractionResult, cfg: ExtractionConfig, method: str, info, mean, std,
                    queries: int) -> ExtractionResult:
    """Write the surrogate as a bundle (with the attack's record as attack.json)."""
    import json

    spec = ModelSpec(cfg.surrogate, info.num_classes, tuple(info.classes), tuple(info.input_shape), mean, std,
                     dict(cfg.surrogate_options))
    stage = stage_record("attack_extract", cfg, method=method, victim_sha256=info.sha256, queries=queries)
    record = json.dumps(result.to_json(), indent=2).encode()
    bundle = save_bundle(out, surrogate, spec, stages=[stage], dataset=cfg.query_set,
                         extra_files={"attack.json": lambda t: t.write_bytes(record)})
    return dataclasses.replace(result, surrogate_bundle=str(bundle.path))


def extract(artifact: str | Path, out: str | Path | None, method: str, cfg: ExtractionConfig | None = None, *,
            eval_data: DataConfig | None = None, reference: str | Path | None = None,
            quiet: bool | None = None) -> ExtractionResult:
    """Attack ``artifact`` with ``method``; write the surrogate bundle to ``out`` (unless None) and return the metrics.

    A served victim (URL) gets only the attack's queries: fidelity and defender accuracy are measured on
    ``reference``, the local file it serves (same sha256 when the server publishes one), or not at all; Triton's
    own row count over the attack is reported beside the client-side count when its statistics are readable.
    """

    cfg = cfg or method_config(method)
    run = ATTACKS.get(method)
    if ATTACKS.entry(method).meta.get("family") != "extraction":
        raise BadInput(f"{method!r} is not an extraction attack")
    if out is not None:
        check_target(out)
    t0 = time.perf_counter()
    test = load_data(eval_data or DataConfig(), "test")
    remote = artifact_kind(artifact) == "remote"
    if reference is not None and not remote:
        raise BadInput("--reference is for a served victim (a URL); a local artifact is its own reference")
    if reference is not None and artifact_kind(reference) == "remote":
        raise BadInput(f"--reference must be a local artifact, not a URL: {reference}")
    with open_runner(artifact) as victim:
        info = victim.info
        victim.expect(cfg.budget, batch=1)  # the attack may query one image at a time
        before = victim.server_statistics() if remote else None
        if tuple(test.info.input_shape) != tuple(info.input_shape) or test.num_classes != info.num_classes:
            raise BadInput(f"the evaluation set {test.info.name!r} ({test.num_classes} classes, {test.info.input_shape}) "
                           f"does not fit the victim ({info.num_classes} classes, {tuple(info.input_shape)})")
        pool, mean, std = _pool_and_norm(cfg, method, info)

        def make_surrogate():
            return create_model(cfg.surrogate, num_classes=info.num_classes, in_channels=info.input_shape[0], mean=mean,
                                std=std, **cfg.surrogate_options)

        clean = open_runner(artifact, undefended=True) if artifact_kind(artifact) == ".onnx" else None
        try:
            oracle = QueryOracle(victim, cfg.budget, hard_label=cfg.hard_label, clean=clean)
            ctx = ExtractionContext(num_classes=info.num_classes, input_shape=tuple(info.input_shape),
                                    make_surrogate=make_surrogate, quiet=quiet)
            torch.manual_seed(cfg.seed)
            t_attack = time.perf_counter()
            surrogate = run(oracle, pool, cfg, ctx).eval()
            t_eval = time.perf_counter()
        finally:
            if clean is not None:
                clean.close()
        if oracle.used > cfg.budget:  # the oracle refuses first; this guards against a bypass
            raise CheckFailed(f"{method} used {oracle.used} queries with a budget of {cfg.budget}")
        acc, fid, defender, server = _evaluate(victim, surrogate, test, before if remote else None, remote,
                                               artifact, reference)
    t_end = time.perf_counter()
    timings = {"setup": t_attack - t0, "queries": oracle.seconds, "attack": t_eval - t_attack - oracle.seconds,
               "evaluation": t_end - t_eval}
    result = ExtractionResult(method=method, artifact=str(artifact), defense=info.defense, budget=cfg.budget,
                              queries_used=oracle.used, surrogate_accuracy=round(acc, 6),
                              fidelity=None if fid is None else round(fid, 6),
                              defender_accuracy=None if defender is None else round(defender, 6), server=server,
                              defense_l1_mean=None if oracle.l1_mean is None else round(oracle.l1_mean, 6),
                              eval_dataset=test.info.name, seconds=round(t_end - t0, 2),
                              details=dict(ctx.log) or None, timings={k: round(v, 3) for k, v in timings.items()})
    if out is None:
        return result
    return _save_surrogate(out, surrogate, result, cfg, method, info, mean, std, oracle.used)


