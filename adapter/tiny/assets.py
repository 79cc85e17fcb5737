"""Where the shipped tiny model lives (assets/tiny/) and the short names `adapter.load` accepts for it:

    adapter.load("tiny")                          base + text adapter
    adapter.load("tiny", adapter="tiny-image")    base + image adapter + its CLIP tower
    adapter.load(base, adapter=..., clip="tiny")  the tiny CLIP tower (and its model config) for any adapter

A name only means the shipped files when no file or folder of that name exists, so local paths win. In a clone
they are assets/tiny; a package built from it (`pip install .`) carries them as adapter/tiny/shipped.
"""

from __future__ import annotations

import os
from pathlib import Path

INSTALLED = Path(__file__).resolve().parent / "shipped"  # where an installed package keeps them (pyproject.toml)
CHECKOUT = Path(__file__).resolve().parents[2] / "assets" / "tiny"  # a clone of the project
ASSETS = INSTALLED if INSTALLED.is_dir() else CHECKOUT
BASE, TEXT, IMAGE, CLIP, EXAMPLES = "base", "text", "image", "clip", "examples"
CLIP_CONFIG, CLIP_WEIGHTS = "clip/tiny-clip.json", "clip/visual.safetensors"
BASE_NAME, TEXT_NAME, IMAGE_NAME, CLIP_NAME = "tiny", "tiny-text", "tiny-image", "tiny"

PathLike = str | os.PathLike


def _named(value: object, name: str) -> bool:
    return isinstance(value, str) and value == name and not Path(value).exists()


def _shipped(relative: str, root: Path) -> Path:
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(f"tiny model: {path} does not exist; build it with `python -m adapter.tiny build`")
    return path


def resolve(base: PathLike, adapter: object, clip: PathLike | None, clip_model: str | None,
            root: Path = ASSETS) -> tuple[PathLike, object, PathLike | None, str | None]:
    """(base, adapter, clip, clip_model) with the tiny model's names replaced by its files; the rest as given."""
    if _named(base, BASE_NAME):
        base = _shipped(BASE, root)
        adapter = TEXT_NAME if adapter is None else adapter
    if _named(adapter, TEXT_NAME):
        adapter = _shipped(TEXT, root)
    elif _named(adapter, IMAGE_NAME):
        adapter = _shipped(IMAGE, root)
        clip = CLIP_NAME if clip is None else clip
    if _named(clip, CLIP_NAME):
        clip = _shipped(CLIP_WEIGHTS, root)
        clip_model = clip_model or str(_shipped(CLIP_CONFIG, root))
    return base, adapter, clip, clip_model


def default_adapter(base: PathLike) -> str | None:
    """The adapter a base is served with when none is named: the embedded base's text adapter, else none."""
    return TEXT_NAME if _named(base, BASE_NAME) else None


def base_name(base: PathLike, root: Path = ASSETS) -> str:
    """The embedded base as `tiny` where `base` is its shipped folder (a loaded model records the folder); any other
    base as given."""
    text = str(base)
    return BASE_NAME if text == BASE_NAME or Path(text).resolve() == (root / BASE).resolve() else text
