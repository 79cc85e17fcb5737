"""One module per on-disk format; `open_base` and `read_adapter` detect which one they were given."""

from __future__ import annotations

import os
from pathlib import Path

from . import meta, native
from .common import LoadedAdapter


def open_base(path: str | os.PathLike):
    """A lazy view of a base LLaMA checkpoint, under Meta's parameter names and layout."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"base: {folder} does not exist")
    if meta.is_meta_folder(folder):
        return meta.MetaCheckpoint(folder)
    raise ValueError(f"base: {folder} is not a LLaMA folder (no params.json)")


def read_adapter(path: str | os.PathLike) -> LoadedAdapter:
    """Read an adapter file or folder in any supported format."""
    return native.read_adapter(path)
