"""Progress reporting on stderr: a rich bar on a terminal, one line per update otherwise.

Set ``EDGEGUARD_QUIET=1`` (or pass ``quiet=True``) to silence it.  stdout stays for results.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout


def _quiet(quiet: bool | None) -> bool:
    return bool(quiet) if quiet is not None else os.environ.get("EDGEGUARD_QUIET", "") not in ("", "0")


def log(message: str, *, quiet: bool | None = None) -> None:
    """One progress line on stderr."""
    if not _quiet(quiet):
        print(message, file=sys.stderr, flush=True)


class _Task:
    def __init__(self, bar, task_id, desc: str, total: int, quiet: bool):
        self._bar, self._id, self.desc, self.total, self.quiet = bar, task_id, desc, total, quiet
        self.done = 0
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._id, advance=n, note=note or "")

    def note(self, note: str) -> None:
        """A status line (e.g. epoch metrics): bar text on a terminal, a log line otherwise."""
        if self._bar is not None:
            self._bar.update(self._id, note=note)
        elif not self.quiet:
            print(f"{self.desc}: {note} [{time.perf_counter() - self._t0:.1f}s]", file=sys.stderr, flush=True)


@contextmanager
def task(desc: str, total: int, *, quiet: bool | None = None) -> Iterator[_Task]:
    q = _quiet(quiet)
    if q or not sys.stderr.isatty():
        yield _Task(None, None, desc, total, q)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        tid = bar.add_task(desc, total=total, note="")
        yield _Task(bar, tid, desc, total, q)


@contextmanager
def silenced(*loggers: str) -> Iterator[io.StringIO]:
    """Swallow what chatty libraries print (stdout, stderr, warnings, the named loggers below ERROR).

    Yields the captured text, so a caller can quote it in an error message.
    """
    buf = io.StringIO()
    handles = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in handles]
    for lg in handles:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(buf), redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(handles, levels, strict=True):
            lg.setLevel(level)


def quiet_exporter():
    """torch.onnx's dynamo exporter narrates on stdout/stderr; keep what it says for the error message only."""
    return silenced("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
