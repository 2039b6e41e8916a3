"""The ``edgeguard`` command line: one thin command per stage over the library, one module per command group.

Contract (DESIGN.md): every command takes ``--json PATH``; exit 0 success, 1 a check failed,
2 bad usage or input, 3 a needed optional backend is missing, 4 a server could not be reached, timed out or
misbehaved.  Results go to stdout, progress to
stderr, and an error is one sentence on stderr -- never a traceback for a user error.

This module is wiring only: the root group, its commands attached with ``cli.add_command``, and :func:`main`.
Shared options live in :mod:`edgeguard.cli.options`.
"""

from __future__ import annotations

import os
import signal
import threading

import click

from edgeguard.cli.attack import attack_group
from edgeguard.cli.bench import bench_cmd, build_engine_cmd, golden_check_cmd, golden_cmd
from edgeguard.cli.evaluate import evaluate_cmd
from edgeguard.cli.export import export_cmd
from edgeguard.cli.importing import import_cmd
from edgeguard.cli.pipeline import pipeline_cmd
from edgeguard.cli.protect import protect_group
from edgeguard.cli.quantize import quantize_cmd
from edgeguard.cli.serve import serve_cmd
from edgeguard.cli.train import info_cmd, train_cmd
from edgeguard.cli.verify import verify_cmd
from edgeguard.errors import EdgeguardError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeguard")
@click.option("-q", "--quiet", is_flag=True, help="No progress output on stderr.")
def cli(quiet: bool) -> None:
    """edgeguard: train, protect, quantize, export and verify image classifiers.

    ARTIFACT arguments take a bundle folder, a .onnx file, a .engine file or a served model's URL
    (http://HOST:PORT/v2/models/NAME or grpc://HOST:PORT/v2/models/NAME).
    """
    if quiet:
        os.environ["EDGEGUARD_QUIET"] = "1"


for _command in (train_cmd, import_cmd, evaluate_cmd, export_cmd, info_cmd, bench_cmd, build_engine_cmd, golden_cmd, golden_check_cmd,
                 pipeline_cmd, protect_group, quantize_cmd, serve_cmd, verify_cmd, attack_group):
    cli.add_command(_command)

_INTERRUPTED = "edgeguard: interrupted; outputs are written atomically, so nothing half-written was left"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and temp-folder cleanup runs (exit 143)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps EdgeguardError to its exit code with one sentence on stderr.  SIGINT and SIGTERM unwind
    like an exception (temp files removed, previous outputs left in place): exit 130 and 143."""
    own_sigterm = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if own_sigterm:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="edgeguard", standalone_mode=False)
    except EdgeguardError as e:
        click.echo(f"edgeguard: error: {e}", err=True)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
            click.echo(_INTERRUPTED.replace("interrupted", "terminated (SIGTERM)"), err=True)
            return 143
        click.echo(_INTERRUPTED, err=True)
        return 130
    except click.exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except OSError as e:  # unreadable input, unwritable --out / --json, full disk
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        click.echo(f"edgeguard: error: cannot access{where}: {e.strerror or e}", err=True)
        return 2
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0

