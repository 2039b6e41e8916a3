"""Hashing and atomic writes: a crash never leaves a half-written file or folder that looks valid."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeguard.errors import BadInput


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=mode)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, writer: Callable[[Path], Any], *, mode: int | None = None) -> None:
    """Call ``writer(tmp_path)`` on a temp file beside ``path``, fsync, then rename over ``path``.  ``mode``: the
    file's permissions (default: 0666 less the umask; 0o600 for a secret)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not the temp name beside it
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)  # mkstemp makes 0600; artifacts: the usual
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, *, may_replace: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a folder in a temp sibling and swap it in place of ``path`` only when the block succeeds.

    An existing ``path`` is replaced only if ``may_replace(path)`` says so (e.g. it is a bundle).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        if path.exists():
            if not may_replace(path):
                raise BadInput(f"refusing to overwrite {path}: it exists and is not an edgeguard bundle")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # interrupted between the two renames: put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_run_dir(out: Path, marker: str, what: str) -> None:
    """``out`` may be a new folder, an empty one, or an earlier edgeguard run of the same kind (it holds ``marker``);
    anything else is refused with one sentence, before any work."""

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise BadInput(f"refusing to write into {out}: it holds files that are not an {what} (choose another --out)")


def claim_run_dir(out: Path, marker: str, what: str, stale: tuple[str, ...] = ()) -> None:
    """Check ``out`` (:func:`check_run_dir`), mark it as ours and remove an earlier run's reports (``stale`` globs), so
    a failed or interrupted run never leaves an earlier run's verdict beside new artifacts."""
    check_run_dir(out, marker, what)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(f"{what} folder\n")
    for pattern in stale:
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)
