"""The fault corpus's shared helper: a snapshot of a folder, to show that a failed command changed nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def take_snapshot(root: Path) -> dict[str, tuple[int, int] | str]:
    """Every entry under ``root`` (hidden ones too): files by size and mtime, folders and links by kind."""
    out: dict[str, tuple[int, int] | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def snapshot():
    return take_snapshot
