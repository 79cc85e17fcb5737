"""Adapters the running app serves beside the ones it started with (trained in its Train tab, uploaded by users):
each on the served base (`load_sharing`: its own tensors only), one that sees on the served CLIP tower, under the
next free PREFIX-N name; beyond a limit the oldest gives way, its folder removed (as when one is removed by
hand)."""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import AdapterArgs
from .engine import Engine, Engines
from .model import Transformer
from .visual import ImageEncoder, attach_image_encoder


@dataclass(frozen=True)
class Sight:
    """A served CLIP tower, shared by an adapter added later that reads it (not loaded again), and the adapter
    served with it, whose visual prompt's shape (kind, width, depth, heads, open_clip model) a new image adapter
    takes."""

    encoder: ImageEncoder
    args: AdapterArgs


def served_sight(engines: Engines, purpose: str) -> Sight:
    """The first served adapter's tower that sees; ValueError naming `purpose` (what needs it) where none does."""
    for engine in engines.by_name.values():
        if engine.can_see_images:
            return Sight(engine.model.image_encoder, engine.model.adapter_args)
    raise ValueError(f"{purpose} reads a CLIP tower, and no adapter served here sees; serve an image adapter "
                     "(--clip) first")


class AddedAdapters:
    """Adapters added to `engines` under PREFIX-N names (`make_engine` wraps a model as the app wraps the
    others); the last `limit` stay served."""

    def __init__(self, engines: Engines, make_engine: Callable[[Transformer], Engine], prefix: str,
                 limit: int) -> None:
        self.engines, self.make_engine, self.prefix, self.limit = engines, make_engine, prefix, limit
        self._added: list[tuple[str, Path]] = []  # (name served, its folder), oldest first
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()  # an add (the oldest giving way) and a removal by hand, one at a time

    def add(self, model: Transformer, folder: Path, sight: Sight | None = None) -> str:
        """Serve `model` (on the served base) under the next free name, with `sight`'s tower if it has a visual
        prompt; `folder` (its files) is removed when it gives way. Returns its name."""
        if model.visual_prompt is not None:
            if sight is None:
                raise ValueError("sight: an adapter with a visual prompt is served with the tower it reads")
            attach_image_encoder(model, sight.encoder, inference=True)
        engine = self.make_engine(model)
        with self._lock:
            name = next(n for n in (f"{self.prefix}{i}" for i in self._numbers) if n not in self.engines.names)
            self.engines.add(name, engine)
            self._added.append((name, folder))
            while len(self._added) > self.limit:
                self._drop(0)
        return name

    def remove(self, name: str) -> bool:
        """Serve `name` no more and remove its folder, if it is one of these; whether it was."""
        with self._lock:
            index = next((i for i, (added, _) in enumerate(self._added) if added == name), None)
            if index is not None:
                self._drop(index)
            return index is not None

    def _drop(self, index: int) -> None:
        name, folder = self._added.pop(index)
        self.engines.remove(name)
        shutil.rmtree(folder, ignore_errors=True)
