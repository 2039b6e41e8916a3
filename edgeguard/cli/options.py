"""What every command shares, defined once: option values, the ``k=v`` type, data config helpers and ``emit``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click


class KeyValue(click.ParamType):
    """``k=v`` -> (k, v); a malformed pair is a usage error (exit 2)."""

    name = "k=v"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        if "=" not in value:
            self.fail(f"{value!r} is not of the form key=value", param, ctx)
        k, v = value.split("=", 1)
        return k.strip(), _scalar(v.strip())


def _scalar(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def merge_flags(base: Any, what: str, /, **flags: Any) -> Any:
    """The one rule for flags over a config (docs/cli.md): a flag given (not None) replaces the config's value,
    everything else keeps it; an ``options`` mapping merges key by key, unless the flag names another thing
    (``name`` / ``arch``), whose options the base's do not describe.  The result goes through ``from_mapping``, so
    flag values are validated and coerced like YAML.  ``base`` is a config or a config class (its defaults)."""
    import dataclasses

    cls = base if isinstance(base, type) else type(base)
    values = {} if isinstance(base, type) else {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    given = {k: v for k, v in flags.items() if v is not None}
    renamed = any(k in given and given[k] != values.get(k) for k in ("name", "arch")) and not isinstance(base, type)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(values.get(k), dict) and not renamed:
            values[k] = {**values[k], **v}
        else:
            values[k] = v
    if renamed:
        for k in ("options", "root"):
            if k not in given and k in values:
                values.pop(k)
    return cls.from_mapping(values, what=what)


def _registry_names(kind: str) -> list[str]:
    from edgeguard.api import registry_names

    return registry_names(kind)


JSON_OUT = click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON to this file.")
SEED = click.option("--seed", type=int, default=None, help="Random seed (default: the config's, else 0).")
DEVICE = click.option("--device", type=str, default=None, help="cpu (default) or cuda[:N].")
class ArtifactRef(click.ParamType):
    """A bundle folder, a .onnx / .engine file (-> Path) or a served model's URL (-> str, kept verbatim)."""

    name = "artifact"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from edgeguard.api import is_remote

        if isinstance(value, Path) or is_remote(value):
            return value
        return Path(value)


ARTIFACT = click.argument("artifact", type=ArtifactRef())
ARTIFACTS = click.argument("artifacts", nargs=-1, required=True, type=ArtifactRef())


def REMOTE(f):  # noqa: N802 (reads like the other option constants)
    """``--timeout``, ``--deadline``, ``--max-qps`` and ``--outputs`` for an artifact given as a server URL; the
    command runs inside them (docs/serving.md: deadlines, the output contract, exit codes)."""

    @functools.wraps(f)
    def wrapper(*args: Any, remote_timeout: float | None = None, remote_deadline: float | None = None,
                max_qps: float | None = None, remote_outputs: str | None = None, **kw: Any) -> Any:
        from edgeguard.api import remote_settings

        with remote_settings(timeout_s=remote_timeout, deadline_s=remote_deadline, max_qps=max_qps,
                             outputs=remote_outputs):
            return f(*args, **kw)

    wrapper = click.option("--outputs", "remote_outputs", type=click.Choice(["probabilities", "logits"]), default=None,
                           help="Server URLs only: what the server returns. probabilities (default): every answer "
                                "must be finite, non-negative and sum to 1; logits: edgeguard applies the softmax.")(wrapper)
    wrapper = click.option("--max-qps", type=click.FloatRange(min=0.0, min_open=True), default=None,
                           help="Server URLs only: at most this many requests per second (be polite to "
                                "someone else's service).")(wrapper)
    wrapper = click.option("--deadline", "remote_deadline", type=click.FloatRange(min=0.0, min_open=True), default=None,
                           help="Server URLs only: seconds the whole check against one server may take (default: "
                                "its request count + 2, times --timeout).")(wrapper)
    return click.option("--timeout", "remote_timeout", type=click.FloatRange(min=0.0, min_open=True), default=None,
                        help="Server URLs only: seconds each request may take in all: connect, send, receive, "
                             "retries (default 30).")(wrapper)


BUNDLE = click.argument("bundle", type=click.Path(path_type=Path))
DATASET = click.option("--dataset", type=click.Choice(_registry_names("dataset")), default=None, help="Dataset registry name.")
DATA_ROOT = click.option("--data-root", type=str, default=None, help="Where the dataset's files are (on-disk formats).")
DATA_OPTION = click.option("--data-option", "data_options", type=KeyValue(), multiple=True, help="Dataset option k=v (repeatable).")
SPLIT = click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)


def _data_config(dataset: str | None, root: str | None, options: tuple, default: Any = None):
    from edgeguard.api import DataConfig

    return merge_flags(default or DataConfig(), "data", name=dataset, root=root, options=dict(options) or None)


def _default_data(artifact: Path):
    """A bundle remembers the dataset it was trained on; use it when --dataset is not given."""
    from edgeguard.api import artifact_data

    return artifact_data(artifact)


def floats(value: str | None, what: str) -> tuple[float, ...] | None:
    """``"0.5,0.25"`` -> (0.5, 0.25); None stays None."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers (got {value!r})") from None


def shape(value: str | None, what: str = "--input-shape") -> tuple[int, ...] | None:
    """``"3,32,32"`` -> (3, 32, 32); None stays None."""
    if value is None:
        return None
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be C,H,W (got {value!r})") from None
    if len(dims) != 3 or min(dims) < 1:
        raise click.BadParameter(f"{what} must be three positive integers C,H,W (got {value!r})")
    return dims


def emit(result: Any, json_path: Path | None, human: str | None = None) -> None:
    """Print the result's summary (or ``human``), write its JSON, and exit 1 if its verdict is negative."""
    if json_path is not None:
        from edgeguard.api import atomic_write_json

        atomic_write_json(json_path, result.to_json())
    click.echo(result.summary() if human is None else human)
    if not getattr(result, "passed", True):
        raise SystemExit(1)
