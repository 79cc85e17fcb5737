"""The procedural world the tiny model learns about: scenes of 1 to 4 coloured shapes on a 3x3 grid.

A scene is pure data (shape, colour, size, slot per object); everything else (text, questions, pictures)
is derived from it. Scenes are split into train and held-out by a hash of their canonical description,
so the split is a property of the scene itself: the same scene is on the same side in every run, for
every seed, and no held-out scene can ever reach training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from math import cos, pi, sin

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225),
    "yellow": (240, 205, 20), "purple": (140, 50, 180), "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# slot -> (column, row) on the 3x3 grid; this order is reading order (top row first), used for listings
SLOTS: dict[str, tuple[int, int]] = {"top": (1, 0), "left": (0, 1), "centre": (1, 1), "right": (2, 1),
                                     "bottom": (1, 2)}
MAX_OBJECTS = 4
HELD_OUT_PERCENT = 10
IMAGE_SIZE = 64
_RADIUS = {"small": 5.5, "large": 9.0}  # in pixels of the 64x64 picture
_SUPERSAMPLE = 4  # drawn 4x larger, then downsampled: smooth edges, still deterministic
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Thing:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str
    slot: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES or self.slot not in SLOTS:
            raise ValueError(f"thing: unknown attribute in {self}")


@dataclass(frozen=True)
class Scene:
    """Up to four things in distinct slots, kept in reading order."""

    things: tuple[Thing, ...]

    def __post_init__(self) -> None:
        slots = [t.slot for t in self.things]
        if not 1 <= len(slots) <= MAX_OBJECTS or len(set(slots)) != len(slots):
            raise ValueError(f"scene: needs 1 to {MAX_OBJECTS} things in distinct slots, got {slots}")
        object.__setattr__(self, "things", tuple(sorted(self.things, key=lambda t: list(SLOTS).index(t.slot))))

    @property
    def key(self) -> str:
        """The canonical description: what the train/held-out split hashes."""
        return "; ".join(f"{t.size} {t.colour} {t.shape} {t.slot}" for t in self.things)

    @property
    def split(self) -> str:
        return split_of(self.key)

    def with_shape(self, shape: str) -> list[Thing]:
        return [t for t in self.things if t.shape == shape]

    def with_colour(self, colour: str) -> list[Thing]:
        return [t for t in self.things if t.colour == colour]

    def at(self, slot: str) -> Thing | None:
        return next((t for t in self.things if t.slot == slot), None)


def split_of(key: str) -> str:
    """"held-out" for HELD_OUT_PERCENT% of keys (by SHA-256), else "train"."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return "held-out" if bucket < HELD_OUT_PERCENT else "train"


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, MAX_OBJECTS)
    slots = rng.sample(list(SLOTS), count)
    return Scene(tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), slot)
                       for slot in slots))


def scenes(seed: int, split: str, count: int, unique: bool = False) -> list[Scene]:
    """`count` random scenes of one split, reproducible from (seed, split); `unique` drops repeats."""
    if split not in ("train", "held-out"):
        raise ValueError(f"split: must be 'train' or 'held-out', got {split!r}")
    rng = random.Random(f"scenes:{seed}:{split}")
    found: list[Scene] = []
    seen: set[str] = set()
    while len(found) < count:
        scene = random_scene(rng)
        if scene.split != split or (unique and scene.key in seen):
            continue
        seen.add(scene.key)
        found.append(scene)
    return found


TWIN_CHANGES = ("colour", "shape", "size", "slot", "swap colours", "swap shapes")


def twin(scene: Scene, rng: random.Random, tries: int = 50) -> Scene | None:
    """A scene of the same split that differs from `scene` in one detail: one thing's colour, shape, size or
    place, or two things swapping their colours or shapes. None when `tries` random changes found none.

    CLIP's hard negative: a batch of random scenes is told apart by their colours alone, so a CLIP trained on
    them learns little of shapes or of which colour goes with which shape; a twin in the same batch can only
    be told apart by the one detail that changed.
    """
    for _ in range(tries):
        things = list(scene.things)
        index = rng.randrange(len(things))
        thing = things[index]
        change = rng.choice(TWIN_CHANGES)
        if change == "colour":
            things[index] = dataclasses.replace(thing, colour=rng.choice([c for c in COLOURS if c != thing.colour]))
        elif change == "shape":
            things[index] = dataclasses.replace(thing, shape=rng.choice([s for s in SHAPES if s != thing.shape]))
        elif change == "size":
            things[index] = dataclasses.replace(thing, size=next(s for s in SIZES if s != thing.size))
        elif change == "slot":
            free = [slot for slot in SLOTS if scene.at(slot) is None]
            if not free:
                continue
            things[index] = dataclasses.replace(thing, slot=rng.choice(free))
        else:
            attribute = "colour" if change == "swap colours" else "shape"
            others = [i for i, other in enumerate(things) if getattr(other, attribute) != getattr(thing, attribute)]
            if not others:
                continue
            other_index = rng.choice(others)
            other = things[other_index]
            things[index] = dataclasses.replace(thing, **{attribute: getattr(other, attribute)})
            things[other_index] = dataclasses.replace(other, **{attribute: getattr(thing, attribute)})
        changed = Scene(tuple(things))
        if changed.split == scene.split and changed.key != scene.key:
            return changed
    return None


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB picture, `size` pixels square, white background."""
    scale = size / IMAGE_SIZE * _SUPERSAMPLE
    big = Image.new("RGB", (size * _SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    cell = IMAGE_SIZE / 3
    for thing in scene.things:
        column, row = SLOTS[thing.slot]
        centre = ((column + 0.5) * cell * scale, (row + 0.5) * cell * scale)
        _draw(draw, thing.shape, centre, _RADIUS[thing.size] * scale, COLOURS[thing.colour])
    return big.resize((size, size), Image.LANCZOS)


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
          colour: tuple[int, int, int]) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    elif shape == "square":
        half = radius * 0.85
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    elif shape == "triangle":
        draw.polygon(_star_points(x, y + radius * 0.15, radius * 1.1, 3, None), fill=colour)
    else:
        draw.polygon(_star_points(x, y + radius * 0.05, radius * 1.1, 5, 0.45), fill=colour)


def _star_points(x: float, y: float, radius: float, points: int, inner: float | None) -> list[tuple[float, float]]:
    """A regular polygon (inner=None) or star pointing up."""
    corners = []
    steps = points * (1 if inner is None else 2)
    for index in range(steps):
        r = radius if inner is None or index % 2 == 0 else radius * inner
        angle = -pi / 2 + 2 * pi * index / steps
        corners.append((x + r * cos(angle), y + r * sin(angle)))
    return corners
