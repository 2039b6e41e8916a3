"""Output-perturbation defenses against model extraction: one registry, one module per defense.

``make_defense(name, params, ctx)`` validates the parameters (unknown name, unknown parameter or a value out
of range is a BadInput naming it) and builds the :class:`Defense` module; fusable defenses are appended
to the exported graph by :func:`edgeguard.export.onnx.export_onnx`, host-side ones are served by
:class:`edgeguard.runtime.defended.HostDefenseRunner`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeguard.config import Config
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext

for _m in pkgutil.iter_modules(__path__):  # every module of this package registers its defense
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def defense_class(name: str) -> type[Defense]:
    """The Defense subclass a registered builder returns (its return annotation): where its capabilities live."""
    hint = typing.get_type_hints(DEFENSES.get(name)).get("return")
    if not (isinstance(hint, type) and issubclass(hint, Defense)):
        raise TypeError(f"defense {name!r}: its builder must be annotated to return a Defense subclass")
    return hint


@dataclass(frozen=True)
class Capabilities:
    """What a defense with a given config can do, read from its class (see :class:`Defense`)."""

    placement: str  # graph | host
    preserves_top1: bool
    context_free: bool


def capabilities(name: str, params: Mapping[str, Any] | None = None) -> Capabilities:
    cls, cfg = defense_class(name), defense_config(name, params)
    return Capabilities(cls.placement_for(cfg), bool(cls.preserves_top1(cfg)), bool(cls.context_free))


def defense_names(**want: Any) -> list[str]:
    """Registered defenses whose capabilities under their default config match ``want`` (e.g. ``placement="host"``,
    ``context_free=True``)."""
    out = []
    for name in DEFENSES.names():
        caps = capabilities(name).__dict__
        if all(caps[k] == v for k, v in want.items()):
            out.append(name)
    return out


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


__all__ = ["DEFENSES", "Capabilities", "Defense", "DefenseContext", "DefenseSpec", "capabilities", "defense_class",
           "defense_config", "defense_label", "defense_names", "make_defense"]
