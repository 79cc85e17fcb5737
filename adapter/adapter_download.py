"""A served adapter downloaded from the running app (the Model tab) in our format, PEFT's or the official v1
release's, written as `python -m adapter.convert` writes them: our and PEFT's folders zipped (one folder NAME in
the zip, which `--adapter` reads once unzipped), the official file as it is (its name says its prompt length, as
the release's does). The last MAX_KEPT downloads stay on disk for the server to hand over."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from .convert import check_target, write_adapter
from .formats.common import write_zip
from .kept_folders import KeptFolders
from .model import Transformer

MAX_KEPT = 8


class AdapterDownloads:
    """Writes served adapters for download into folders of `folder`, the oldest removed beyond MAX_KEPT."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folders = KeptFolders(Path(folder) if folder is not None else
                                   Path(tempfile.gettempdir()) / "llama-adapter-downloads", MAX_KEPT)

    def write(self, model: Transformer, name: str, to: str) -> Path:
        """The file to download: adapter `name` (`model`'s) in format `to`; ValueError naming why it cannot be."""
        check_target(to)
        args = model.adapter_args
        if args.learns_nothing:
            raise ValueError(f"adapter: {name} is the frozen base without an adapter; there is nothing to download")
        stem = file_stem(name)
        work = self.folders.new(f"{stem}-{to}-")
        try:
            if to == "official-v1":
                return write_adapter(model, work / f"llama_adapter_len{args.prompt_len}_layer{args.prompt_layers}_"
                                                   f"{stem}.pth", to)
            return _zipped(write_adapter(model, work / stem, to, model.base_path), work / f"{stem}.zip")
        except BaseException:
            self.folders.forget(work)
            raise


def file_stem(name: str) -> str:
    """A served adapter's name as one file name: its last part ("hf:owner/x" -> "x", "/runs/a/best" -> "best"),
    other characters than letters, digits, ".", "_" and "-" as "-" (a name is never a path to write under)."""
    last = re.split(r"[/\\:]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "-", last).strip(".-") or "adapter"


def _zipped(written: Path, path: Path) -> Path:
    """The adapter's folder (or the folder of its one file) as a zip holding one folder of the same name."""
    folder = written if written.is_dir() else written.parent
    return write_zip(path, folder.name, sorted(folder.iterdir()))
