"""Adapters the running app serves beside the ones it started with (trained in its Train tab, uploaded by users):
each on the served base (`load_sharing`: its own tensors only), one that sees on the served CLIP tower, under the
next free PREFIX-N name; beyond a limit the oldest gives way, its folder removed (as when one is removed by
hand). Private ones (`--private-adapters`) are served to the session that added them alone, each session keeping
its last few, and go when it ends."""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import AdapterArgs
from .engine import Engine, Engines
from .kept_folders import remove_at_exit
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


PRIVATE_SESSIONS = 4  # private: sessions' worth of adapters held at once, all sessions together


class AddedAdapters:
    """Adapters added to `engines` under PREFIX-N names (`make_engine` wraps a model as the app wraps the
    others); the last `limit` stay served. With `private`, each is served to the session that added it alone: each
    session keeps its last `limit`, and all of them together the last PRIVATE_SESSIONS times that."""

    def __init__(self, engines: Engines, make_engine: Callable[[Transformer], Engine], prefix: str,
                 limit: int, private: bool = False) -> None:
        self.engines, self.make_engine, self.prefix, self.limit = engines, make_engine, prefix, limit
        self.private = private
        self._added: list[tuple[str, Path, str | None]] = []  # (name served, its folder, its session), oldest first
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()  # an add (the oldest giving way) and a removal by hand, one at a time
        self._in_use: set[str] = set()  # names whose folders a run is writing in: not removed by hand meanwhile
        remove_at_exit(lambda added=self._added: [folder for _, folder, _ in added])

    def add(self, model: Transformer, folder: Path, sight: Sight | None = None, owner: str | None = None) -> str:
        """Serve `model` (on the served base) under the next free name, with `sight`'s tower if it has a visual
        prompt, to everyone or (private) to session `owner` alone; `folder` (its files) is removed when it gives
        way. Returns its name."""
        engine = self._engine(model, sight)
        owner = owner if self.private else None
        with self._lock:
            name = next(n for n in (f"{self.prefix}{i}" for i in self._numbers) if not self.engines.taken(n))
            self.engines.add(name, engine, owner)
            self._added.append((name, folder, owner))
            while sum(added_by == owner for _, _, added_by in self._added) > self.limit:
                self._drop(next(i for i, (_, _, added_by) in enumerate(self._added) if added_by == owner))
            while len(self._added) > self.limit * (PRIVATE_SESSIONS if self.private else 1):
                self._drop(0)
        return name

    def holds(self, name: str, folder: Path) -> bool:
        """Whether `name` is still served from `folder` (it has not given way nor been removed)."""
        with self._lock:
            return any(added == name and kept == folder for added, kept, _ in self._added)

    def replace(self, name: str, model: Transformer, sight: Sight | None = None) -> None:
        """Serve `model` under `name` instead, from the same folder, to the same users."""
        engine = self._engine(model, sight)
        with self._lock:
            self.engines.replace(name, engine)

    @contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """While this lasts, `name` is not removed by hand (a run resumed in its folder is writing there)."""
        with self._lock:
            self._in_use.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._in_use.discard(name)

    def remove(self, name: str) -> bool:
        """Serve `name` no more and remove its folder, if it is one of these; whether it was."""
        with self._lock:
            if name in self._in_use:
                raise ValueError(f"adapter: {name}'s run is being resumed in its folder; stop it first")
            index = next((i for i, (added, _, _) in enumerate(self._added) if added == name), None)
            if index is not None:
                self._drop(index)
            return index is not None

    def forget(self, owner: str) -> list[str]:
        """Serve no more what session `owner` added privately (its page was closed); the names removed."""
        with self._lock:
            gone = [name for name, _, added_by in self._added if added_by == owner]
            for name in gone:
                self._drop(next(i for i, (added, _, _) in enumerate(self._added) if added == name))
            return gone

    def _engine(self, model: Transformer, sight: Sight | None) -> Engine:
        if model.visual_prompt is not None:
            if sight is None:
                raise ValueError("sight: an adapter with a visual prompt is served with the tower it reads")
            attach_image_encoder(model, sight.encoder, inference=True)
        return self.make_engine(model)

    def _drop(self, index: int) -> None:
        name, folder, _ = self._added.pop(index)
        self.engines.remove(name)
        shutil.rmtree(folder, ignore_errors=True)
