"""Optional dependencies stay optional: with ``tensorrt`` and ``torchvision`` unimportable, every
edgeguard module imports and every CLI command prints its help (as Polygraphy's dependency test does).

Each check runs in a fresh interpreter whose ``sys.meta_path`` starts with a finder that refuses the
blocked names, so a module-level ``import tensorrt`` anywhere fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import pytest

from edgeguard.cli import cli

BLOCKED = ("tensorrt", "torchvision")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    for _m in list(sys.modules):
        if _m.split(".")[0] in BLOCKED:
            del sys.modules[_m]
    """
)

IMPORT_ALL = BLOCKER + textwrap.dedent(
    """
    import importlib, json, pkgutil, traceback
    import edgeguard

    results = {}
    for mod in pkgutil.walk_packages(edgeguard.__path__, prefix="edgeguard."):
        if mod.name == "edgeguard.__main__":  # runs the CLI on import
            continue
        try:
            importlib.import_module(mod.name)
            results[mod.name] = None
        except BaseException:
            results[mod.name] = traceback.format_exc()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"results": results, "leaked": leaked}))
    """
)

HELP_ALL = BLOCKER + textwrap.dedent(
    """
    import contextlib, io, json, sys
    from edgeguard.cli import cli, main

    def paths(cmd, prefix=()):
        yield list(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from paths(sub, (*prefix, name))

    out = {}
    for path in paths(cli):
        buf, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            try:
                rc = main([*path, "--help"])
            except BaseException as e:  # anything escaping main is a bug
                rc = repr(e)
        out[" ".join(path)] = {"rc": rc, "stdout": buf.getvalue(), "stderr": err.getvalue()}
    print(json.dumps(out))
    """
)


def _run(code: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _command_paths(cmd: click.Command, prefix: tuple[str, ...] = ()) -> list[str]:
    out = [" ".join(prefix)]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _command_paths(sub, (*prefix, name))
    return out


COMMANDS = _command_paths(cli)


def test_blocker_blocks():
    """The blocker itself works: tensorrt and torchvision cannot be imported under it."""
    code = BLOCKER + (
        "\nimport json\nleaked = []\nfor n in BLOCKED:\n    try:\n        __import__(n)\n    except ImportError:\n"
        "        pass\n    else:\n        leaked.append(n)\nprint(json.dumps({'leaked': leaked}))\n"
    )
    assert _run(code)["leaked"] == []


def test_every_module_imports_without_optional_backends():
    res = _run(IMPORT_ALL)
    results = res["results"]
    assert len(results) >= 20 and "edgeguard.runtime.trt_runner" in results and "edgeguard.cli" in results
    failed = {name: tb for name, tb in results.items() if tb is not None}
    assert not failed, "\n\n".join(f"{n}:\n{tb}" for n, tb in failed.items())
    assert res["leaked"] == []


@pytest.fixture(scope="module")
def help_texts() -> dict:
    return _run(HELP_ALL)


def test_help_covers_every_command(help_texts):
    assert set(help_texts) == set(COMMANDS)
    shipped = {"train", "evaluate", "export", "info", "bench", "pipeline", "quantize", "verify",
               "protect watermark", "attack finetune"}
    assert shipped <= set(COMMANDS), shipped - set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "edgeguard")
def test_help(help_texts, command):
    res = help_texts[command]
    assert res["rc"] == 0, res
    assert "Traceback" not in res["stderr"]
    text = res["stdout"]
    assert text.strip() and "Usage: edgeguard" in text
    assert f"edgeguard {command}".strip() in text and "--help" in text
