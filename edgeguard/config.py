"""Typed, frozen config objects that round-trip through JSON and load from YAML.

``Config.to_dict()`` gives ``{"type": "TrainConfig", "version": 1, "params": {...}}``; manifest stage
entries are exactly these dicts.  ``config_from_dict`` only instantiates ``Config`` subclasses
(an allow-list built as classes are defined): no pickles, no ``eval``.  Validation lives in each
class's ``__post_init__`` and raises :class:`BadInput` with a message that states the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgeguard.errors import BadInput
from edgeguard.registry import coerce_config

_CONFIG_TYPES: dict[str, type[Config]] = {}


def require(cond: bool, message: str) -> None:
    """Config validation helper: raise BadInput(message) unless ``cond``."""
    if not cond:
        raise BadInput(message)


@dataclass(frozen=True)
class Config:
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _CONFIG_TYPES[cls.__name__] = cls

    def params(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else (list(v) if isinstance(v, tuple) else v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": self.version, "params": self.params()}

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None, *, what: str | None = None) -> Config:
        """Build from a YAML/CLI mapping; unknown keys and wrong types are BadInput."""
        params = dict(params or {})
        for f in dataclasses.fields(cls):
            sub = _nested_config_type(cls, f.name)
            if sub is None or f.name not in params or isinstance(params[f.name], sub):
                continue
            v = params[f.name]
            if v is not None and not isinstance(v, Mapping):  # e.g. ``data: digits`` instead of ``data: {name: digits}``
                raise BadInput(f"{what or cls.__name__}.{f.name} must be a mapping of settings, got {v!r:.60}")
            params[f.name] = sub.from_mapping(v, what=f"{what or cls.__name__}.{f.name}")  # None (empty section): defaults
        return coerce_config(cls, params, what=what or cls.__name__)

    def replace(self, **changes: Any) -> Config:
        """Copy with the given fields changed; ``None`` values are ignored (flags not given)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def _nested_config_type(cls: type, name: str) -> type[Config] | None:
    import typing

    hint = typing.get_type_hints(cls).get(name)
    return hint if isinstance(hint, type) and issubclass(hint, Config) else None


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of ``Config.to_dict``; refuses types that are not Config subclasses."""
    try:
        cls = _CONFIG_TYPES[d["type"]]
    except (KeyError, TypeError):
        raise BadInput(f"not a known config record: {d!r:.80}") from None
    if d.get("version", 1) > cls.version:
        raise BadInput(f"{d['type']} version {d['version']} is newer than this edgeguard understands")
    params = dict(d.get("params", {}))
    for k, v in params.items():
        if isinstance(v, Mapping) and "type" in v and "params" in v:
            params[k] = config_from_dict(v)
    return cls.from_mapping(params)


# --- the configs shared by several stages ------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(Config):
    """Which dataset to load (a name in the dataset registry), from where, with what options."""

    name: str = "digits"
    root: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(isinstance(self.options, dict), "data.options must be a mapping")
        reserved = sorted({"root", "split"} & set(self.options))
        require(not reserved, f"dataset option {reserved[0] if reserved else ''!r} is not an option: use --data-root / --split")


@dataclass(frozen=True)
class ModelConfig(Config):
    """Which architecture to build (a name in the model registry) and its keyword options."""

    arch: str = "smallcnn"
    options: dict = field(default_factory=dict)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise BadInput(f"config file {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise BadInput(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"config file {p} must hold a mapping at the top level")
    return data
