"""Host-side defenses: a Runner wrapper that applies a defense module on the host after the graph.

Defenses that cannot live in an inference graph (MAD needs gradients through a surrogate; online
ModelGuard-S keeps growing state) ship as the undefended graph plus a state file (``model.defense.pt``)
whose sha256 the graph's metadata records.  ``open_runner`` on such a graph returns a
:class:`HostDefenseRunner`, so accuracy checks, attacks and benchmarks query it exactly like a fused one.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeguard.defenses import DEFENSES, DefenseContext, defense_config
from edgeguard.errors import BadInput
from edgeguard.models import create_model
from edgeguard.models.imported import build_imported
from edgeguard.runtime.base import DefenseRecord, Runner, RunnerInfo

SIDECAR_FORMAT = "edgeguard-host-defense"


def load_host_defense(graph_path: Path, record: dict[str, Any]):
    """Rebuild the defense recorded in a graph's metadata from its state file (hash-checked)."""

    name = record.get("name", "?")
    sidecar = str(record.get("sidecar") or "")
    if not sidecar or Path(sidecar).name != sidecar:
        raise BadInput(f"{graph_path} names no valid state file for its host-side defense {name!r}")
    side = graph_path.parent / sidecar
    if not side.is_file():
        raise BadInput(f"{graph_path} is served with the host-side defense {name!r}, but its state file "
                       f"{side.name} is missing next to it")
    data = side.read_bytes()  # hash and load the same bytes
    if hashlib.sha256(data).hexdigest() != record.get("sidecar_sha256"):
        raise BadInput(f"{side} does not match the hash {graph_path.name} recorded; the defense state was modified")
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        m = blob["model"]
        num_classes = int(blob["num_classes"])
    except Exception as e:
        raise BadInput(f"{side} is not a readable defense state file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != SIDECAR_FORMAT or blob.get("name") != name:
        raise BadInput(f"{side} is not the state of the {name!r} defense")
    cfg = defense_config(name, blob.get("params") or {})

    def factory():
        if m.get("source") is not None:  # an imported model: its factory (hash-checked) or its program, rebuilt
            program = blob.get("program")
            return build_imported(m["source"], num_classes=m["num_classes"], input_shape=m["input_shape"],
                                  mean=m["mean"], std=m["std"],
                                  program=None if program is None else program.numpy().tobytes())
        return create_model(m["arch"], num_classes=m["num_classes"], in_channels=m["in_channels"], mean=m["mean"],
                            std=m["std"], **dict(m.get("options") or {}))

    ctx = DefenseContext(num_classes=num_classes, model_factory=factory)
    entry = DEFENSES.entry(name)
    restore = entry.meta.get("restore")
    if restore is None:
        raise BadInput(f"the {name!r} defense cannot be restored from a state file")
    return restore(cfg, ctx, blob["state"]).eval()


class HostDefenseRunner(Runner):
    """Wraps a Runner whose graph returns clean probabilities; applies ``defense`` on the host."""

    def __init__(self, inner: Runner, defense, **kw):
        super().__init__(inner.path, batch_size=inner.batch_size, **kw)
        self.inner = inner
        self.defense = defense.eval()

    def _open_impl(self) -> RunnerInfo:
        info = self.inner.open().info
        details = dict(info.details)
        details["host_defense"] = self.defense.describe()
        d = self.defense.describe()  # the live module says what runs
        record = DefenseRecord(self.defense.name, dict(d.get("params") or {}), str(d.get("placement", "host")))
        return RunnerInfo(backend=info.backend, precision=info.precision, defense=self.defense.name,
                          input_shape=info.input_shape, classes=info.classes, sha256=info.sha256, path=info.path,
                          device=f"{info.device}+host", details=tuple(details.items()), defense_record=record)

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        p = self.inner._predict_impl(x)
        logits = torch.log(torch.from_numpy(np.maximum(p, 1e-30)))
        with torch.no_grad():
            q, flag = self.defense.forward_with_flag(logits, torch.from_numpy(x))
        self.flagged += int(flag.sum().item())
        return q.detach().numpy().astype(np.float32)

    def _close_impl(self) -> None:
        self.inner.close()
