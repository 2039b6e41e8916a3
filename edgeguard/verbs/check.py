"""Verbs that check an artifact: accuracy and defense measurements, description, benchmarks, verification of the
owner's watermark and fragile triggers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard.bundle import (
    VAULT,
    Vault,
    bundle_data_config,
    is_bundle,
    load_bundle,
)
from edgeguard.config import DataConfig
from edgeguard.data import default_ood, load_data
from edgeguard.errors import BadInput
from edgeguard.evaluate import AccuracyResult, BenchConfig, BenchResult, bench_runners, evaluate_accuracy
from edgeguard.evaluate.defense import DefenseMeasurement, measure_defense
from edgeguard.export.wrap import wrapped_original
from edgeguard.protect.fragile import FragileStore, verify_store
from edgeguard.protect.watermark import VAULT_RECORD, verify_watermark
from edgeguard.results import Result
from edgeguard.runtime import artifact_kind, open_runner


def artifact_data(artifact: str | Path) -> DataConfig:
    """The dataset to evaluate an artifact on when none is named: a bundle's own training data, else digits."""
    return bundle_data_config(load_bundle(artifact, verify=False)) if is_bundle(artifact) else DataConfig()


def evaluate_artifact(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    min_accuracy: float | None = None,
    device: str | None = None,
    batch_size: int = 256,
) -> AccuracyResult:
    with open_runner(artifact, device=device) as runner:
        return evaluate_accuracy(runner, load_data(data, split), batch_size=batch_size, min_accuracy=min_accuracy)


def evaluate_defense(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    ood: DataConfig | None = None,
    bench: BenchConfig | None = None,
    device: str | None = None,
):
    """Defense measurements of a defended artifact against its own undefended view (see evaluate.defense)."""

    with open_runner(artifact, device=device) as defended, open_runner(artifact, device=device, undefended=True) as clean:
        if defended.info.defense == "none":
            raise BadInput(f"{artifact} has no output defense to measure")
        record = defended.info.defense_record
        ood_cfg = ood or default_ood(defended.info.input_shape)
        ood_data = load_data(ood_cfg, "test")
        return measure_defense(defended, clean, load_data(data, split), ood_data, bench=bench,
                               params=dict(record.params), placement=record.placement)


@dataclass(frozen=True)
class EvaluationResult(Result):
    """``edgeguard evaluate``: accuracy of an artifact, plus the defense measurements when it carries a defense."""

    accuracy: AccuracyResult
    defense: DefenseMeasurement | None = None

    @property
    def passed(self) -> bool:
        return self.accuracy.passed

    def to_json(self) -> dict[str, Any]:
        out = self.accuracy.to_json()
        if self.defense is not None:
            out["defense_measurements"] = self.defense.to_json()
        return out

    def summary(self) -> str:
        a, art = self.accuracy, self.accuracy.artifact
        line = (f"accuracy {a.accuracy:.4f} ({a.correct}/{a.n}) on {a.dataset}/{a.split}: "
                f"{art['path']} [{art['backend']} {art['precision']}, defense {art['defense']}]")
        return line + ("\n" + self.defense.summary() if self.defense is not None else "")


def evaluate(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    min_accuracy: float | None = None,
    ood: DataConfig | None = None,
    latency: bool = True,
    device: str | None = None,
    seed: int = 0,
) -> EvaluationResult:
    """Accuracy of ``artifact`` on ``data``; for a defended artifact also the defense against its undefended view
    (agreement, L1 on the split and on ``ood``, and, with ``latency``, the overhead at batch 1 and 64)."""
    acc = evaluate_artifact(artifact, data, split=split, min_accuracy=min_accuracy, device=device)
    if acc.artifact["defense"] == "none" or artifact_kind(artifact) != ".onnx":  # only a graph has an undefended view
        return EvaluationResult(acc)
    bench = BenchConfig(batch_sizes=(1, 64), warmup=5, iterations=60, seed=seed) if latency else None
    return EvaluationResult(acc, evaluate_defense(artifact, data, split=split, ood=ood, bench=bench, device=device))


@dataclass(frozen=True)
class ArtifactDescription(Result):
    info: dict[str, Any]
    details: dict[str, Any]
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"info": self.info, **self.details}

    def summary(self) -> str:
        i = self.info
        lines = [
            f"artifact    {i['path']}",
            f"backend     {i['backend']} ({i['device']})",
            f"precision   {i['precision']}",
            f"defense     {i['defense']}",
            f"input       N x {' x '.join(str(d) for d in i['input_shape'])} "
            + ("(normalisation unknown: not recorded in the graph)" if "third_party" in self.details
               else "(raw images in [0,1] or uint8)"),
            f"classes     {len(i['classes'])}: {', '.join(i['classes'][:10])}{' ...' if len(i['classes']) > 10 else ''}",
            f"sha256      {i['sha256']}",
        ]
        if "manifest" in self.details:
            m = self.details["manifest"]
            lines.append(f"arch        {m['arch']} (edgeguard {m.get('edgeguard_version', '?')})")
            lines.append(f"stages      {' -> '.join(s['stage'] for s in m['stages'])}")
            lines.append(f"vault       {', '.join(self.details['vault_entries']) or '(empty)'}")
        if "onnx" in self.details:
            o = self.details["onnx"]
            lines.append(f"onnx        opset {o['opset']}, {o['nodes']} nodes, {o['bytes']:,} bytes")
        if "third_party" in self.details:
            t = self.details["third_party"]
            lines.append(f"outputs     {t['outputs']} ({t['why']})" + ("; the runner applies a softmax"
                                                                        if t["outputs"] == "logits" else ""))
            lines.append("note        not an edgeguard artifact: `edgeguard export FILE --mean .. --std .. --out W.onnx` "
                         "wraps it (raw images in, probabilities out, defense fused)")
        if "wrapped" in self.details:
            w = self.details["wrapped"]
            a, b = w["node_range"]
            i0, i1 = w["initializer_range"]
            lines.append(f"wraps       {w['file']} (sha256 {w['sha256'][:12]}, returns {w['outputs']}, layout "
                         f"{w['layout']}): {b - a} nodes, {i1 - i0} initializers "
                         + ("byte-identical (checked now)" if w["intact"] else "CHANGED since wrapping"))
        return "\n".join(lines)


def describe_artifact(path: str | Path) -> ArtifactDescription:
    """What an artifact is: the Runner's info plus the manifest (bundle) or the graph summary (ONNX)."""
    kind = artifact_kind(path)
    details: dict[str, Any] = {"kind": kind.lstrip(".")}
    if kind == "bundle":
        b = load_bundle(path)
        details["manifest"] = b.manifest
        details["vault_entries"] = b.vault.names()
    elif kind == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise BadInput(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
        ops: dict[str, int] = {}
        for n in proto.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        details["onnx"] = {
            "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "ir_version": proto.ir_version,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "nodes": len(proto.graph.node),
            "ops": dict(sorted(ops.items())),
            "metadata": {p.key: p.value for p in proto.metadata_props},
            "bytes": Path(path).stat().st_size,
        }
        if "edgeguard.wrapped" in details["onnx"]["metadata"]:
            details["wrapped"] = wrapped_original(proto)
    with open_runner(path) as runner:
        info = runner.info.to_json()
        if kind == ".onnx" and not getattr(runner, "metadata", None):
            details["third_party"] = {"outputs": runner.outputs_detected, "why": runner.outputs_reason,
                                      "normalization": "unknown (not recorded in the graph)"}
    return ArtifactDescription(info=info, details=details)


def bench_artifacts(
    paths: list[str | Path], cfg: BenchConfig | None = None, *, device: str | None = None, names: list[str] | None = None
) -> BenchResult:
    if not paths:
        raise BadInput("bench needs at least one artifact")
    runners = []
    try:
        for p in paths:
            runners.append(open_runner(p, device=device))
        shapes = {r.info.input_shape for r in runners}
        if len(shapes) > 1:
            raise BadInput(f"artifacts take different input shapes {sorted(map(str, shapes))}; bench them separately")
        return bench_runners(runners, cfg, names=names)
    finally:
        for r in runners:
            r.close()


@dataclass(frozen=True)
class VerifyResult(Result):
    watermark: Any  # WatermarkVerification, or None when the vault holds no watermark
    fragile: Any = None  # FragileVerification, or None when the vault holds no fragile enrolment
    clean: AccuracyResult | None = None

    @property
    def passed(self) -> bool:
        return all(part.passed for part in (self.watermark, self.fragile) if part is not None)

    def summary(self) -> str:
        """One line: the artifact, then each verdict the vault allowed, then the clean accuracy if measured."""
        parts = []
        w = self.watermark
        if w is not None:
            parts.append(f"watermark {w.verdict.upper()}: {w.matches}/{w.n} triggers match (p-value {w.p_value:.3g}, "
                         f"threshold {w.m_star} at alpha {w.alpha:g}, chance 1/{w.k})")
        if self.fragile is not None:
            parts.append(self.fragile.summary())
        art = (w or self.fragile).artifact
        line = f"{art['path']} [{art['backend']} {art['precision']}]: " + "; ".join(parts)
        if self.clean is not None:
            c = self.clean
            line += f"; clean accuracy {c.accuracy:.4f} ({c.correct}/{c.n}) on {c.dataset}/{c.split}"
        return line

    def to_json(self) -> dict[str, Any]:
        first = self.watermark if self.watermark is not None else self.fragile
        out: dict[str, Any] = {"artifact": first.artifact, "passed": self.passed}
        if self.watermark is not None:
            out["watermark"] = self.watermark.to_json()
        if self.fragile is not None:
            out["fragile"] = self.fragile.to_json()
        if self.clean is not None:
            out["clean"] = self.clean.to_json()
        return out


def verify_artifact(
    artifact: str | Path,
    vault: str | Path | None = None,
    *,
    alpha: float | None = None,
    data: DataConfig | None = None,
    split: str = "test",
    device: str | None = None,
) -> VerifyResult:
    """Watermark verdict and fragile-trigger verdict of an artifact against an owner vault (a bundle defaults to its
    own); each part runs when the vault holds it (``VAULT/vault.json`` watermark, ``VAULT/fragile``)."""

    if vault is None:
        if artifact_kind(artifact) != "bundle":
            raise BadInput(f"verifying {artifact} needs the owner's vault: pass --vault BUNDLE/vault")
        vault = Path(artifact) / VAULT
    if not Path(vault).is_dir():
        raise BadInput(f"vault {vault} does not exist")
    owner = Vault(vault)
    fragile = FragileStore.find(vault)
    has_watermark = VAULT_RECORD in owner
    if not has_watermark and fragile is None:
        raise BadInput(f"vault {vault} holds neither a watermark nor a fragile enrolment")
    with open_runner(artifact, device=device) as runner:
        wm = verify_watermark(runner, owner, alpha=alpha) if has_watermark else None
        fr = verify_store(runner, fragile) if fragile is not None else None
        clean = evaluate_accuracy(runner, load_data(data, split)) if data is not None else None
    return VerifyResult(wm, fr, clean)


@dataclass(frozen=True)
class VerifyResults(Result):
    results: tuple[VerifyResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.results)

    def to_json(self) -> dict[str, Any]:
        if len(self.results) == 1:
            return self.results[0].to_json()
        return {"results": [r.to_json() for r in self.results], "passed": self.passed}


def verify_artifacts(artifacts: list[str | Path], vault: str | Path | None = None, **kw: Any) -> VerifyResults:
    """``verify_artifact`` for several artifacts (e.g. FP32 and INT8 side by side) with one vault."""
    if vault is None and len(artifacts) > 1:
        vault = Path(artifacts[0]) / "vault" if artifact_kind(artifacts[0]) == "bundle" else None
    if len(artifacts) > 1:  # one claim over several artifacts: Bonferroni (docs/watermark.md)
        base = kw.pop("alpha", None)
        if base is None and vault is not None and Path(vault).is_dir():
            base = Vault(vault).get_json("watermark").get("alpha", 1e-3) if "watermark" in Vault(vault) else 1e-3
        # the fragile verdict is exact (no significance level), so only the watermark's alpha is corrected
        kw["alpha"] = (base or 1e-3) / len(artifacts)
    return VerifyResults(tuple(verify_artifact(a, vault, **kw) for a in artifacts))
