"""The one base class of every verb's result.

A result is a frozen dataclass.  :meth:`Result.to_json` is derived from its fields (a nested result becomes its own
``to_json()``, tuples become lists) plus ``passed``; ``passed`` is the verdict the CLI turns into exit code 1 (a
field, or a property computed from the fields); :meth:`Result.summary` is the one-paragraph text the CLI prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def jsonable(value: Any) -> Any:
    """A field value as JSON-ready data: objects with ``to_json`` by it, other dataclasses field by field, tuples and
    lists item by item, dicts value by value."""
    if hasattr(value, "to_json") and not isinstance(value, type):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


class Result:
    """Mixin for the frozen dataclasses the verbs return (see the module docstring)."""

    passed: bool = True  # overridden by a field or a property where a verb has a verdict

    def to_json(self) -> dict[str, Any]:
        out = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        out["passed"] = bool(self.passed)
        return out

    def summary(self) -> str:
        """What the CLI prints for this result."""
        return type(self).__name__


@dataclass(frozen=True)
class ReportResult(Result):
    """A run that writes a report into its folder (the pipeline, the grid): its JSON is the report itself."""

    out: str
    report: dict[str, Any]

    @property
    def passed(self) -> bool:  # type: ignore[override]
        return bool(self.report["passed"])

    def to_json(self) -> dict[str, Any]:
        return self.report
