"""Fragile triggers (Yin, Yin & Zhang, ICIP 2022): detect any modification of a deployed model, zero false alarms.

Method and measurements: docs/fragile.md (Yin et al., ICIP 2022).  A small generator G maps n fixed latents to n trigger images, trained
(through the one training loop) so that the frozen classifier C labels trigger i as ``s_i = i mod M`` while its
softmax on every trigger is as flat as possible (``L = CE(P, s) + a·Var(P)``): the triggers sit next to several
decision boundaries, so almost any change of C flips some of them.  C is never modified (checked by hash).

Generation needs a differentiable copy of the deployed computation (docs/fragile.md): the float model of a bundle,
or, for an ``.onnx`` artifact and an INT8 bundle, the artifact's own graph run in PyTorch with its Q/DQ nodes as
fake-quant (straight-through gradient; :mod:`edgeguard.runtime.onnx_torch`).

Deployed artifacts compute slightly different numbers (ONNX Runtime, INT8, TensorRT), so triggers are *enrolled*
per artifact (docs/fragile.md): run R times at each batch size through the artifact's Runner, drop unstable triggers and
near-ties (log-probability margin below ``max(4·noise, tau)``), and keep the artifact's own labels as the reference.
Verification is then exact on labels: intact iff every kept trigger returns its reference label, and (the Runner
returns probabilities) every log-probability stays within ``3·noise + eps`` of the enrolled one.

Choice of ``a`` (measured on the digits CNN, see docs/fragile.md): the paper's a = 200 (CIFAR-10, ResNet-18) leaves a small CNN
that *can* equalise the nine other classes at the analytic optimum of L -- key probability 0.208, others 0.088, a
log-probability margin of 0.86 -- so one epoch of last-layer fine-tuning flipped no label.  The default therefore sets
``a`` from a target margin ``m`` at that optimum: with p = e^m / (e^m + M - 1) the key probability,
``a = M(M-1) / (2 p (M p - 1))`` (m = 0.2 gives a = 1931 for M = 10).  ``a`` can still be given directly.

When some triggers still miss their key after ``steps`` (a classifier whose flat regions favour other classes; the
3-channel gratings model reached only 14/100 at a = 1932 and 89/100 at a = 200), training continues with the spec's
margin floor ``b · mean relu(gamma - m_i)`` (b = 50, gamma = margin/2).  It is a fallback only: switched on from the
start it made digits triggers robust to last-layer fine-tuning (AccTri stayed 1.0 where it fell to 0.10 without).
When the shared generator stalls anyway, the triggers it left behind get their pixels optimised one by one
(:func:`_refine`); the others are kept as the generator made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgeguard.bundle import VAULT, load_bundle
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.fileio import sha256_file
from edgeguard.progress import log
from edgeguard.protect.fragile.enrol import (
    RECORD_FORMAT,
    EnrolConfig,
    FragileVerification,
    TooFewStable,
    check_record,
    enrol,
    record_hash,
    verify,
)
from edgeguard.protect.fragile.generator import (
    VARIANTS,
    FragileConfig,
    FragileKey,
    Generator,
    a_for_margin,
    boost,
    generate,
    secret_key,
    trigger_stats,
)
from edgeguard.protect.fragile.refine import row_variance
from edgeguard.protect.fragile.store import FOLDER, FragileStore, verify_store
from edgeguard.results import Result
from edgeguard.runtime import artifact_kind, open_runner
from edgeguard.runtime.onnx_torch import differentiable_copy

__all__ = [
    "FOLDER", "RECORD_FORMAT", "VARIANTS", "EnrolConfig", "FragileConfig", "FragileKey", "FragileResult", "FragileStore",
    "FragileVerification", "Generator", "a_for_margin", "check_record", "enrol", "generate", "protect_fragile",
    "record_hash", "row_variance", "secret_key", "surrogate_for", "trigger_stats", "verify", "verify_store",
]

def surrogate_for(artifact: str | Path, surrogate: str | Path | None = None) -> tuple[nn.Module, str]:
    """The differentiable model the generator trains against, and a description of it: ``surrogate`` when given,
    else the artifact itself -- a float bundle's model, an INT8 bundle's QDQ graph, an ONNX graph (fake-quant)."""

    src = Path(surrogate) if surrogate is not None else Path(artifact)
    kind = artifact_kind(src)
    if kind == "bundle":
        b = load_bundle(src)
        if b.quantized:
            return differentiable_copy(src / "model.onnx"), f"{src} (INT8 QDQ graph, fake-quant)"
        return b.load_model(), f"{src} (float model)"
    if kind == ".onnx":
        return differentiable_copy(src), f"{src} (ONNX graph{', fake-quant' if _is_qdq(src) else ''})"
    raise BadInput(f"{src} cannot be differentiated ({kind}): pass --surrogate with the bundle or the .onnx it was built from")


def _is_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


@dataclass(frozen=True)
class FragileResult(Result):
    store: str
    artifact: dict[str, Any]
    surrogate: str
    trigger_sha256: str
    generation: dict[str, Any]
    kept: int
    n: int
    key_agreement: float
    noise: float
    margin_floor: float
    margin_min: float
    check: FragileVerification
    passed: bool = True

    def summary(self) -> str:
        g = self.generation
        gen = (f"generated against {self.surrogate} in {g['steps']} steps (a = {g['a']:.4g}, mean top-1 probability "
               f"{g['mean_top1_probability']:.3f}); " if "steps" in g else "stored key; ")
        return (f"fragile triggers enrolled on {self.artifact['path']} [{self.artifact['backend']} "
                f"{self.artifact['precision']}]: {gen}{self.kept}/{self.n} kept (margin >= {self.margin_floor:.2g}, "
                f"min {self.margin_min:.3g}, noise {self.noise:.2g}), agreement with the key {self.key_agreement:.3f}; "
                f"re-verified {self.check.verdict}; stored in {self.store} (key {self.trigger_sha256[:12]})")


def protect_fragile(artifact: str | Path, out: str | Path | None = None, cfg: FragileConfig | None = None,
                    enrol_cfg: EnrolConfig | None = None, *, surrogate: str | Path | None = None,
                    key_sha256: str | None = None, device: str | None = None, quiet: bool | None = None) -> FragileResult:
    """Generate triggers against the artifact's differentiable copy (or reuse a stored key), enrol them on the
    artifact through its Runner, check once, and write key + record to ``out`` (default ``BUNDLE/vault/fragile``)."""

    cfg = cfg or FragileConfig()
    kind = artifact_kind(artifact)
    if out is None:
        if kind != "bundle":
            raise BadInput(f"enrolling {artifact} needs --out VAULT/fragile (the owner's vault, never shipped)")
        out = Path(artifact) / VAULT / FOLDER
    store = FragileStore(out)
    with open_runner(artifact, device=device) as runner:
        info = runner.info
        file_hash = sha256_file(artifact) if kind != "bundle" else info.sha256
        if key_sha256 is not None:
            names = [n for n in store.vault.names() if n.startswith(f"key-{key_sha256[:12]}")]
            if not names:
                raise BadInput(f"{out} has no fragile key {key_sha256[:12]}")
            key = store.get_key(_key_sha(store, names[0]))
            generation = {"reused_key": key.sha256}
            described = "(stored key)"
            record = enrol(runner, key, enrol_cfg, generation=generation)
        else:
            model, described = surrogate_for(artifact, surrogate)
            log(f"fragile: generating {cfg.n} triggers against {described} (a = {cfg.weight(info.num_classes):.4g})",
                quiet=quiet)
            shape = tuple(int(d) for d in info.input_shape) if all(info.input_shape) else None
            if shape is None:
                raise BadInput(f"{artifact} has a dynamic input size; fragile triggers need a fixed C x H x W")
            key = generate(model, shape, info.num_classes, cfg, quiet=quiet)
            key, record = _enrol_generated(runner, key, enrol_cfg, model, info.num_classes, cfg, described, quiet)
            generation = record["generation"]
        check = verify(runner, record, key)
    if check.verdict != "intact":
        raise CheckFailed(f"the enrolled triggers did not re-verify on {artifact} ({check.verdict}); nothing was written")
    after = sha256_file(artifact) if kind != "bundle" else info.sha256
    if after != file_hash:
        raise CheckFailed(f"{artifact} changed during enrolment; nothing was written")
    store.put_key(key)
    store.put_record(record)
    return FragileResult(str(store.path), info.to_json(), described, key.sha256, generation, len(record["kept"]),
                         record["n"], record["key_agreement"], record["noise"], record["margin_floor"],
                         record["margin_min"], check)


def _enrol_generated(runner, key: FragileKey, enrol_cfg: EnrolConfig | None, model: nn.Module, num_classes: int,
                     cfg: FragileConfig, described: str, quiet: bool | None):
    """Enrol freshly generated triggers; when the artifact leaves too many unstable or within its margin floor, those
    are refined on the differentiable copy to twice, then four times the largest margin among them (:func:`boost`)
    and enrolment is tried again."""
    generation = lambda k: {**k.stats, "config": cfg.params(), "surrogate": described}  # noqa: E731
    for factor in (4.0, 8.0):
        try:
            return key, enrol(runner, key, enrol_cfg, generation=generation(key))
        except TooFewStable as e:
            if cfg.refine_steps == 0 or cfg.variant in ("non", "var"):
                raise
            key = boost(model, key, e.dropped, num_classes, cfg, factor, quiet=quiet)
    return key, enrol(runner, key, enrol_cfg, generation=generation(key))


def _key_sha(store: FragileStore, name: str) -> str:
    t = store.vault.get_tensors(name)
    return FragileKey(t["images"], t["key"], {}).sha256
