"""Output-perturbation defenses against model extraction: one registry, one module per defense.

``make_defense(name, params, ctx)`` validates the parameters (unknown name, unknown parameter or a value out
of range is a BadInput naming it) and builds the :class:`Defense` module; fusable defenses are appended
to the exported graph by :func:`edgeguard.export.onnx.export_onnx`, host-side ones are served by
:class:`edgeguard.runtime.defended.HostDefenseRunner`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeguard.config import Config
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext

_MODULES = ("none", "heuristic", "reverse_sigmoid", "rounding", "topk", "gaussian", "adaptive_misinformation",
            "modelguard_s", "modelguard_w", "mad")
for _m in _MODULES:
    importlib.import_module(f"edgeguard.defenses.{_m}")


@dataclass(frozen=True)
class DefenseSpec(Config):
    """A defense by name with its parameters (YAML ``{name: heuristic, params: {beta: 0.7}}``)."""

    name: str = "none"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        defense_config(self.name, self.params)  # unknown names and bad parameters fail at load time


def defense_config(name: str, params: Mapping[str, Any] | None = None):
    """The validated config of defense ``name`` (None for parameterless defenses)."""
    return DEFENSES.config_from(name, dict(params or {}))


def defense_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """``heuristic[top1_guard=False]``: a defense and its non-default parameters, for tables."""
    params = dict(params or {})
    return name + ("[" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + "]" if params else "")


def make_defense(name: str, params: Mapping[str, Any] | None, ctx: DefenseContext) -> Defense:
    """The defense built from its parameters and the context; a defense with a ``seed`` parameter that the
    parameters leave out takes the run's seed (``--seed``), so one seed reproduces (and varies) the whole run."""
    params = dict(params or {})
    cfg = defense_config(name, params)
    if cfg is not None and "seed" not in params and any(f.name == "seed" for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, seed=int(ctx.seed))
    module = DEFENSES.get(name)(cfg, ctx)
    return module.eval()


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseSpec", "defense_config", "defense_label", "make_defense"]
