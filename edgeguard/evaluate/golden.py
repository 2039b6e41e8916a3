"""Golden outputs: record an artifact's probabilities on fixed inputs on CPU, check any artifact against them.

``record_golden`` runs a reference artifact (normally the shipped ``.onnx`` in ONNX Runtime on CPU) on the first
``n`` images of a dataset split and, when an owner vault is given, on its watermark and fragile triggers, and writes one
``.npz`` (inputs, probabilities, a JSON header).  ``check_golden`` runs another artifact (the engine on the GPU or
Jetson, a bundle, another ONNX) on the same inputs and compares, group by group (docs/tensorrt.md):

=============  ====================================================================================
precision      rule (``--atol`` / ``--min-top1`` override)
=============  ====================================================================================
fp32 / tf32    max |Δprob| <= 1e-3
fp16           max |Δprob| <= 1e-2
int8 (either)  top-1 agreement >= 0.99 (max |Δprob| reported; INT8 kernels round differently)
=============  ====================================================================================

The rule is picked from the lower of the two precisions (reference and checked).  With a vault the file holds the
trigger images, so it is as secret as the vault: keep it with the owner and the device, never publish it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.bundle import Vault
from edgeguard.config import Config, DataConfig, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.fileio import atomic_write, sha256_file
from edgeguard.protect.fragile import FragileStore
from edgeguard.protect.watermark import VAULT_RECORD, read_key
from edgeguard.results import Result
from edgeguard.runtime import open_runner

FORMAT = "edgeguard-golden"
TOLERANCES = {"fp32": 1e-3, "tf32": 1e-3, "fp16": 1e-2}
INT8_MIN_TOP1 = 0.99


@dataclass(frozen=True)
class GoldenConfig(Config):
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"
    n: int = 256

    def __post_init__(self) -> None:
        require(self.n >= 1, f"golden n must be at least 1 (got {self.n})")
        require(self.split in ("train", "test"), f"split must be train or test (got {self.split!r})")


@dataclass(frozen=True)
class GoldenRecord(Result):
    path: str
    sha256: str
    groups: dict[str, int]  # group -> rows
    artifact: dict[str, Any]
    passed: bool = True

    def summary(self) -> str:
        groups = ", ".join(f"{k} {v}" for k, v in self.groups.items())
        return (f"wrote {self.path} (sha256 {self.sha256[:12]}): {groups} inputs through {self.artifact['path']} "
                f"[{self.artifact['backend']} {self.artifact['precision']}]")


def record_golden(artifact: str | Path, out: str | Path, cfg: GoldenConfig | None = None, *,
                  vault: str | Path | None = None) -> GoldenRecord:
    """Run ``artifact`` on CPU on the clean inputs (and the vault's watermark and fragile triggers) and write ``out``
    (.npz)."""

    cfg = cfg or GoldenConfig()
    out = Path(out)
    if out.suffix != ".npz":
        raise BadInput(f"--out {out} must end in .npz")
    if vault is not None and not Path(vault).is_dir():
        raise BadInput(f"vault {vault} does not exist")
    groups: dict[str, np.ndarray] = {}
    data = load_data(cfg.data, cfg.split)
    n = min(cfg.n, len(data))
    groups["clean"] = data.images[:n].numpy()
    labels = {"clean": data.labels[:n].numpy()}
    if vault is not None:
        if VAULT_RECORD in Vault(vault):
            key, _ = read_key(Vault(vault))
            groups["watermark"] = key.images.numpy()
            labels["watermark"] = key.labels.numpy()
        store = FragileStore.find(vault)
        for sha in dict.fromkeys(r["trigger_sha256"] for r in (store.records() if store else [])):
            fkey = store.get_key(sha)  # every fragile trigger set enrolled from this vault
            groups[f"fragile-{sha[:12]}"] = fkey.images.numpy()
            labels[f"fragile-{sha[:12]}"] = fkey.key.numpy()
        if len(groups) == 1:
            raise BadInput(f"vault {vault} holds neither a watermark nor a fragile enrolment")
    arrays: dict[str, np.ndarray] = {}
    with open_runner(artifact, device="cpu") as runner:
        info = runner.info
        for g, x in groups.items():
            arrays[f"{g}/inputs"] = x
            arrays[f"{g}/labels"] = labels[g].astype(np.int64)
            arrays[f"{g}/probs"] = runner.predict(x)
    header = {
        "format": FORMAT,
        "version": 1,
        "artifact": info.to_json(),
        "config": cfg.to_dict(),
        "groups": {g: len(x) for g, x in groups.items()},
        "vault_triggers": vault is not None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    arrays["header"] = np.array(json.dumps(header))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temp name
            np.savez_compressed(f, **arrays)

    atomic_write(out, write)
    return GoldenRecord(str(out), sha256_file(out), header["groups"], header["artifact"])


def load_golden(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """(header, {group: {"inputs", "labels", "probs"}}); :class:`BadInput` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"golden file {path} does not exist")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(str(arrays.pop("header")))
    except Exception as e:
        raise BadInput(f"{path} is not an edgeguard golden file ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BadInput(f"{path} is not an edgeguard golden file")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        g, _, part = key.partition("/")
        groups.setdefault(g, {})[part] = arr
    for g, parts in groups.items():
        if set(parts) != {"inputs", "labels", "probs"} or len(parts["inputs"]) != len(parts["probs"]):
            raise BadInput(f"{path}: group {g!r} is incomplete")
    return header, groups


def tolerance(reference: str, checked: str, *, atol: float | None = None, min_top1: float | None = None) -> dict[str, Any]:
    """The comparison rule for two precisions: {"rule", "atol" (None: not asserted), "min_top1" (None: not asserted)}."""
    precs = {str(reference).lower(), str(checked).lower()}
    if any("int8" in p for p in precs):
        rule, a, t = "int8", None, INT8_MIN_TOP1
    elif any("fp16" in p or "bf16" in p for p in precs):
        rule, a, t = "fp16", TOLERANCES["fp16"], None
    else:
        rule, a, t = "fp32", TOLERANCES["fp32"], None
    return {"rule": rule, "atol": atol if atol is not None else a, "min_top1": min_top1 if min_top1 is not None else t}


@dataclass(frozen=True)
class GroupCheck:
    group: str
    n: int
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    passed: bool


@dataclass(frozen=True)
class GoldenCheck(Result):
    artifact: dict[str, Any]
    reference: dict[str, Any]
    golden: str
    rule: dict[str, Any]
    groups: tuple[GroupCheck, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.groups)

    def summary(self) -> str:
        r = self.rule
        bound = (f"max |Δprob| <= {r['atol']:g}" if r["atol"] is not None else "") + (
            f"{' and ' if r['atol'] is not None else ''}top-1 agreement >= {r['min_top1']:g}" if r["min_top1"] is not None else "")
        lines = [f"golden check {'PASS' if self.passed else 'FAIL'} ({r['rule']} rule: {bound}): {self.artifact['path']} "
                 f"[{self.artifact['backend']} {self.artifact['precision']}] vs {self.reference['backend']} "
                 f"{self.reference['precision']} reference"]
        for g in self.groups:
            lines.append(f"  {g.group}: {g.n} inputs, top-1 agreement {g.top1_agreement:.4f}, max |Δprob| "
                         f"{g.max_abs_diff:.2e}, mean {g.mean_abs_diff:.2e} -> {'pass' if g.passed else 'FAIL'}")
        return "\n".join(lines)

def compare_group(name: str, ref: np.ndarray, got: np.ndarray, rule: dict[str, Any]) -> GroupCheck:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    agree = float(np.mean(got.argmax(1) == ref.argmax(1))) if len(ref) else 1.0
    mx = float(diff.max()) if diff.size else 0.0
    ok = (rule["atol"] is None or mx <= rule["atol"]) and (rule["min_top1"] is None or agree >= rule["min_top1"])
    return GroupCheck(name, len(ref), round(agree, 6), mx, float(diff.mean()) if diff.size else 0.0, bool(ok))


def check_golden(artifact: str | Path, golden: str | Path, *, atol: float | None = None, min_top1: float | None = None,
                 device: str | None = None) -> GoldenCheck:
    """Run ``artifact`` on every golden group and compare with the recorded probabilities."""

    header, groups = load_golden(golden)
    ref = header["artifact"]
    with open_runner(artifact, device=device) as runner:
        info = runner.info
        if info.num_classes != len(ref["classes"]):
            raise BadInput(f"{artifact} has {info.num_classes} classes but the golden file records {len(ref['classes'])}")
        shapes = {tuple(parts["inputs"].shape[1:]) for parts in groups.values()}
        bad = next((s for s in shapes if any(e is not None and e != a for e, a in zip(info.input_shape, s, strict=False))
                    or len(s) != len(info.input_shape)), None)
        if bad is not None:
            raise BadInput(f"{golden} records inputs of shape {bad} but {artifact} takes "
                           f"{tuple(info.input_shape)}: the goldens belong to another model")
        rule = tolerance(ref["precision"], info.precision, atol=atol, min_top1=min_top1)
        results = tuple(compare_group(g, parts["probs"], runner.predict(parts["inputs"]), rule)
                        for g, parts in sorted(groups.items()))
    return GoldenCheck(info.to_json(), ref, str(golden), rule, results)
