"""MagicGuard, the protection stage: insert the guard into a float bundle after checking fidelity.

The guard itself (``y = x + a·sin(w·x)``, its config, :func:`attach`, :func:`strip`, :func:`owner_gradients` and the
exported-graph checks) is part of the model and lives in :mod:`edgeguard.models.guard`, so a bundle rebuilds a
guarded model without importing a protection; it is re-exported here.  Method and measurements: docs/magicguard.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeguard.bundle import bundle_data_config, check_target, load_bundle, save_bundle, stage_record
from edgeguard.data import load_data
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.models.guard import (  # noqa: F401  (the guard, re-exported)
    GUARD_OPS,
    LOGITS,
    MANIFEST_KEY,
    VARIANTS,
    GuardedSite,
    MagicGuard,
    MagicGuardConfig,
    attach,
    check_guard_graph,
    export_record,
    guard_nodes,
    guard_paths,
    guards,
    owner_gradients,
    parity_atol,
    strip,
)
from edgeguard.protect.watermark import VAULT_RECORD, read_key
from edgeguard.results import Result

# --- the protection stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagicGuardResult(Result):
    bundle: str
    sha256: str
    config: dict[str, Any]
    n: int
    accuracy_before: float
    accuracy_after: float
    top1_agreement: float
    max_abs_change: float  # of the model output (logits), guarded vs unguarded
    min_top2_gap: float  # smallest top-2 logit gap of the unguarded model on the test split
    trigger_accuracy_before: float | None
    trigger_accuracy_after: float | None
    passed: bool = True

    def summary(self) -> str:
        c = self.config
        trig = (f", trigger accuracy {self.trigger_accuracy_before:.3f} -> {self.trigger_accuracy_after:.3f}"
                if self.trigger_accuracy_before is not None else "")
        return (f"guarded bundle {self.bundle} (sha256 {self.sha256[:12]}): MagicGuard {c['variant']} at {c['site']}, "
                f"a={c['a']:g}, w={c['w']:g} (a*w={c['a'] * c['w']:g}); test accuracy {self.accuracy_before:.4f} -> "
                f"{self.accuracy_after:.4f}, top-1 agreement {self.top1_agreement:.4f}, max |Δlogit| "
                f"{self.max_abs_change:.4f}{trig}")


MAX_ACCURACY_CHANGE = 0.005  # acceptance: |test accuracy - BA0| <= 0.5 point (docs/magicguard.md)
MIN_AGREEMENT = 0.995
MAX_TRIGGER_CHANGE = 0.01


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)


def protect_magicguard(source: str | Path, out: str | Path, cfg: MagicGuardConfig | None = None) -> MagicGuardResult:
    """Insert the guard into ``source`` (a float bundle) and write the guarded bundle to ``out``.

    Fidelity is checked on the bundle's test split (and its watermark triggers, if the vault holds them) before
    anything is written: the output moves by at most ``a`` (logit site), top-1 agreement >= 99.5%, accuracy within
    0.5 point, trigger accuracy within 1 point; otherwise :class:`CheckFailed` and no bundle.
    """

    cfg = cfg or MagicGuardConfig()
    check_target(out)
    bundle = load_bundle(source)
    if bundle.spec.guard:
        raise BadInput(f"{source} already carries a MagicGuard ({bundle.spec.guard['site']}); protect its unguarded parent")
    model = bundle.load_model()
    spec = bundle.spec
    test = load_data(bundle_data_config(bundle), "test")
    if test.info.input_shape != spec.input_shape:
        raise BadInput(f"the bundle's test data is {test.info.input_shape} but the model takes {spec.input_shape}")
    x, y = test.tensors()
    before = _logits(model, x)
    triggers = None
    if VAULT_RECORD in bundle.vault:
        key, _ = read_key(bundle.vault)
        triggers = (key.as_float(), key.labels)
        trig_before = _logits(model, triggers[0])
    attach(model, cfg, spec.input_shape)
    after = _logits(model, x)
    change = float((after - before).abs().max()) if len(x) else 0.0
    top2 = before.topk(2, dim=1).values
    res = dict(
        n=len(y),
        accuracy_before=float((before.argmax(1) == y).float().mean()),
        accuracy_after=float((after.argmax(1) == y).float().mean()),
        top1_agreement=float((after.argmax(1) == before.argmax(1)).float().mean()),
        max_abs_change=change,
        min_top2_gap=float((top2[:, 0] - top2[:, 1]).min()),
        trigger_accuracy_before=None,
        trigger_accuracy_after=None,
    )
    if triggers is not None:
        res["trigger_accuracy_before"] = float((trig_before.argmax(1) == triggers[1]).float().mean())
        res["trigger_accuracy_after"] = float((_logits(model, triggers[0]).argmax(1) == triggers[1]).float().mean())
    problems = []
    if cfg.site == LOGITS and not change <= cfg.a + 1e-6:
        problems.append(f"the logits moved by {change:.3g} > a = {cfg.a:g}")
    if res["top1_agreement"] < MIN_AGREEMENT:
        problems.append(f"top-1 agreement {res['top1_agreement']:.4f} < {MIN_AGREEMENT}")
    if abs(res["accuracy_after"] - res["accuracy_before"]) > MAX_ACCURACY_CHANGE:
        problems.append(f"test accuracy moved {res['accuracy_before']:.4f} -> {res['accuracy_after']:.4f}")
    if triggers is not None and abs(res["trigger_accuracy_after"] - res["trigger_accuracy_before"]) > MAX_TRIGGER_CHANGE:
        problems.append(f"trigger accuracy moved {res['trigger_accuracy_before']:.3f} -> {res['trigger_accuracy_after']:.3f}")
    if problems:
        raise CheckFailed("the guard changes the model's predictions (" + "; ".join(problems) + "); lower a, or choose "
                          "another site. Nothing was written")
    res = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items()}
    stage = stage_record("magicguard", cfg, **res)
    guarded = save_bundle(out, model, spec.with_guard(cfg.params()), stages=[*bundle.stages, stage], parent=bundle)
    return MagicGuardResult(str(guarded.path), guarded.sha256, cfg.params(), **res)
