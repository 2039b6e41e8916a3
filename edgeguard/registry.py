"""The one generic registry.  Models, datasets, defenses and attacks each own one instance.

    MODELS = Registry("model")

    @MODELS.register("smallcnn", input_size=32)
    def smallcnn(num_classes, in_channels): ...

    MODELS.get("smallcnn")          # -> the entry point
    MODELS.entry("smallcnn").meta   # -> {"input_size": 32}
    MODELS.names(family="cnn")      # -> names whose metadata matches

Names are lowercase ``[a-z0-9_]`` and are the same string in Python, YAML, ``--help``, manifests and
JSON.  An unknown name raises :class:`BadInput` listing the known ones; a duplicate fails at import.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeguard.errors import BadInput

_NAME = re.compile(r"^([a-z0-9_]+:)?[a-z0-9_]+$")  # an optional namespace: ``art:knockoff`` runs another library's code


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    config: type | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, config: type | None = None, **meta: Any) -> Callable:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must match [a-z0-9_]+, optionally after a namespace and ':'")

        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._entries[name] = Entry(name, fn, config, dict(meta))
            return fn

        return deco

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise BadInput(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).fn

    def names(self, **meta: Any) -> list[str]:
        return sorted(n for n, e in self._entries.items() if all(e.meta.get(k) == v for k, v in meta.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def config_from(self, name: str, params: Mapping[str, str]) -> Any:
        """Build the entry's config from ``k=v`` strings, coercing to the field types."""
        cls = self.entry(name).config
        if cls is None:
            if params:
                raise BadInput(f"{self.kind} {name!r} takes no parameters (got {', '.join(params)})")
            return None
        return coerce_config(cls, params, what=f"{self.kind} {name!r}")


def coerce_config(cls: type, params: Mapping[str, Any], *, what: str) -> Any:
    """Instantiate dataclass ``cls`` from loosely typed values (strings from the CLI, YAML scalars)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise BadInput(f"unknown parameter {unknown[0]!r} for {what}; known: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{what} parameter {k!r}") for k, v in params.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise BadInput(f"invalid parameters for {what}: {e}") from None


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], what) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise BadInput(f"{what} must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        elem = args[0] if args else str
        out = [_coerce(v.strip() if isinstance(v, str) else v, elem, what) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
    except (TypeError, ValueError):
        name = str(getattr(hint, "__name__", hint))
        raise BadInput(f"{what} must be {'an' if name[:1] in 'aeiou' else 'a'} {name} (got {value!r})") from None
    return value
