"""How the world is put into words: noun phrases, places, counts and whole-scene descriptions.

Shared by the plain-text corpus (what the base model reads) and the question inputs (what the adapters
read), so that a scene given as an adapter's input is worded the way the base learned to read scenes.
"""

from __future__ import annotations

import random

from .world import Scene, Thing

PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(thing: Thing, rng: random.Random | None = None) -> str:
    """"a large red star"; with `rng`, sometimes "a red star" (for stories, where sizes may go unsaid)."""
    words = f"{thing.size} {thing.colour} {thing.shape}"
    if rng is not None and rng.random() < 0.15:
        words = f"{thing.colour} {thing.shape}"
    return f"{article(words)} {words}"


def listing(words: list[str]) -> str:
    """"red, blue, green": the exact form of a listing answer."""
    return ", ".join(words)


def describe(scene: Scene, rng: random.Random) -> str:
    """The scene in one of several wordings, always naming every thing's size, colour, shape and place."""
    parts = [(noun_phrase(t), PLACES[t.slot]) for t in scene.things]
    style = rng.randrange(4)
    if style == 0:
        return " ".join(f"There is {np} {place}." for np, place in parts)
    if style == 1:
        return " ".join(f"{np[0].upper()}{np[1:]} is {place}." for np, place in parts)
    if style == 2:
        items = [f"{np} {place}" for np, place in parts]
        joined = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return f"The picture shows {joined}."
    count = len(parts)
    items = "; ".join(f"{np} {place}" for np, place in parts)
    return f"{count} shape{'s' if count > 1 else ''}: {items}."


def count_sentence(count: int, noun: str) -> str:
    """"There are 3 shapes." / "There is 1 star." (digits: counting answers are digits)."""
    return f"There is 1 {noun}." if count == 1 else f"There are {count} {noun}s."
