"""Saying why a path that should name a file does not: it is absent, a folder, or something else (a device, a
pipe), so that `--data runs/` is not reported as missing."""

from __future__ import annotations

import os
from pathlib import Path


def missing(path: str | os.PathLike) -> str:
    """"PATH does not exist", and why where it begins with a ~ that no shell expanded (quoted, or set in a Space's
    variables or a .env file): Python reads it as a folder named "~"."""
    hint = ("; a leading ~ is your home folder only where a shell expands it (unquoted): give the whole path"
            if str(path).startswith("~") else "")
    return f"{path} does not exist{hint}"


def not_a_file(path: str | os.PathLike) -> str:
    """`path` and what it is instead of a file ("... does not exist", "... is a folder, not a file")."""
    path = Path(path)
    if not path.exists():
        return missing(path)
    if path.is_dir():
        return f"{path} is a folder, not a file"
    return f"{path} is not a regular file"


BASE_NAMES = "a path or a name (tiny, hf:owner/name)"  # what a base argument may be, wherever one is taken


def require_path(value: object, what: str, expected: str = "a file's path") -> None:
    """A ValueError naming `what` where `value` is no path (pathlib's TypeError named neither it nor the setting):
    a command's own checks, for the functions Python programs call."""
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"{what}: expected {expected}, got {value!r}"[:200])
