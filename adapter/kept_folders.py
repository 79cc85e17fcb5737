"""Folders a running app writes files into for its users to download (a converted adapter, a saved conversation):
the last few stay on disk for the server to hand over, older ones are removed, so a long-running server's
temporary folder does not grow with every click."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path


def remove_at_exit(folders: Callable[[], Iterable[Path]]) -> None:
    """Remove the folders `folders()` names when the process ends normally (a stopped server left every kept
    download, upload and trained adapter behind, restart after restart). `folders` reads a collection of paths
    only, so that nothing larger is kept alive until then."""
    atexit.register(lambda: [shutil.rmtree(folder, ignore_errors=True) for folder in list(folders())])


class KeptFolders:
    """New folders under `folder` (made on first use), the oldest removed beyond `max_kept`."""

    def __init__(self, folder: str | Path, max_kept: int) -> None:
        self.folder, self.max_kept = Path(folder), max_kept
        self._kept: list[Path] = []
        self._lock = threading.Lock()
        remove_at_exit(lambda kept=self._kept: kept)

    def new(self, prefix: str) -> Path:
        """An empty folder of its own to write one download into (`forget` it if writing fails)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=self.folder))
        with self._lock:
            self._kept.append(work)
            while len(self._kept) > self.max_kept:
                shutil.rmtree(self._kept.pop(0), ignore_errors=True)
        return work

    def forget(self, work: Path) -> None:
        """Remove a folder whose writing failed."""
        with self._lock:
            if work in self._kept:
                self._kept.remove(work)
        shutil.rmtree(work, ignore_errors=True)
