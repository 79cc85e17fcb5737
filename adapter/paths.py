"""Saying why a path that should name a file does not: it is absent, a folder, or something else (a device, a
pipe), so that `--data runs/` is not reported as missing."""

from __future__ import annotations

import os
from pathlib import Path


def not_a_file(path: str | os.PathLike) -> str:
    """`path` and what it is instead of a file ("... does not exist", "... is a folder, not a file")."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    return f"{path} is not a regular file"
