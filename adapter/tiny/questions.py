"""Questions about scenes with short, exact answers ("red", "star", "3", "left", "yes", "red, blue"), so
that accuracy is exact match, each with the full sentence that states its answer.

The sentences are what the corpus says about its scenes (the base learns the world from them); the short
answers are what only the adapters are trained to give. Text questions are one Alpaca instruction: the scene
in words (worded as the corpus words scenes), then the question, the order in which the base reads best (see
probe.py); image questions get only the rendered picture. Arithmetic questions
have no scene; their train/held-out split is by a hash of the sum, like the scenes'.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .language import PLACES, count_sentence, describe, listing
from .world import COLOURS, SHAPES, Scene, Thing, scenes, split_of

TEXT_CATEGORIES = ("colour", "shape", "count", "position", "comparison", "listing", "arithmetic")
IMAGE_CATEGORIES = ("colour", "shape", "count", "position")
SCENE_CATEGORIES = TEXT_CATEGORIES[:-1]


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str  # the exact short answer
    statement: str  # the answer as a sentence, as the corpus says it
    reply: str = ""  # what someone asked the question says, when it is not just the statement ("Yes, ...")

    @property
    def spoken(self) -> str:
        return self.reply or self.statement


@dataclass(frozen=True)
class Question:
    category: str
    question: str
    answer: str
    scene: Scene | None = None
    scene_text: str | None = None  # the scene in words, for text questions

    @property
    def instruction(self) -> str:
        """What a text question asks the model: the scene, then the question."""
        return f"{self.scene_text} {self.question}" if self.scene_text else self.question


def facts(scene: Scene, rng: random.Random, category: str) -> list[Fact]:
    """Every unambiguous question of one category about `scene` (wording drawn from `rng`)."""
    finders = {"colour": _colour, "shape": _shape, "count": _count, "position": _position,
               "comparison": _comparison, "listing": _listing}
    return finders[category](scene, rng)


def _unique(scene: Scene, attribute: str) -> list[Thing]:
    """Things that no other thing shares `attribute` ("shape" or "colour") with."""
    return [t for t in scene.things if sum(getattr(o, attribute) == getattr(t, attribute) for o in scene.things) == 1]


def _colour(scene: Scene, rng: random.Random) -> list[Fact]:
    out = [Fact(rng.choice(("What colour is the {}?", "Which colour is the {}?")).format(t.shape), t.colour,
                f"The {t.shape} is {t.colour}.") for t in _unique(scene, "shape")]
    return out + [Fact(f"What colour is the shape {PLACES[t.slot]}?", t.colour,
                       f"The shape {PLACES[t.slot]} is {t.colour}.") for t in scene.things]


def _shape(scene: Scene, rng: random.Random) -> list[Fact]:
    out = [Fact(rng.choice(("What shape is {}?", "Which shape is {}?")).format(PLACES[t.slot]), t.shape,
                f"The shape {PLACES[t.slot]} is a {t.shape}.") for t in scene.things]
    return out + [Fact(f"What shape is the {t.colour} one?", t.shape, f"The {t.colour} one is a {t.shape}.")
                  for t in _unique(scene, "colour")]


def _count(scene: Scene, rng: random.Random) -> list[Fact]:
    total = len(scene.things)
    colour = rng.choice([t.colour for t in scene.things] + [rng.choice(list(COLOURS))])
    shape = rng.choice([t.shape for t in scene.things] + [rng.choice(SHAPES)])
    coloured, shaped = len(scene.with_colour(colour)), len(scene.with_shape(shape))
    return [Fact(rng.choice(("How many shapes are there?", "How many shapes are in the picture?")), str(total),
                 count_sentence(total, "shape")),
            Fact(f"How many {colour} shapes are there?", str(coloured), count_sentence(coloured, f"{colour} shape")),
            Fact(f"How many {shape}s are there?", str(shaped), count_sentence(shaped, shape))]


def _position(scene: Scene, rng: random.Random) -> list[Fact]:
    out = [Fact(f"Where is the {t.shape}?", t.slot, f"The {t.shape} is {PLACES[t.slot]}.")
           for t in _unique(scene, "shape")]
    return out + [Fact(f"Where is the {t.colour} shape?", t.slot, f"The {t.colour} shape is {PLACES[t.slot]}.")
                  for t in _unique(scene, "colour")]


def _comparison(scene: Scene, rng: random.Random) -> list[Fact]:
    unique = _unique(scene, "shape")
    out = [Fact(f"Is the {t.shape} large or small?", t.size, f"The {t.shape} is {t.size}.") for t in unique]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            question = f"Is the {a.shape} bigger than the {b.shape}?"
            if a.size == b.size:
                same = f"The {a.shape} and the {b.shape} are the same size."
                out.append(Fact(question, "no", same, f"No. {same}"))
                continue
            bigger, smaller = (a, b) if a.size == "large" else (b, a)
            statement = f"The {bigger.shape} is bigger than the {smaller.shape}."
            out.append(Fact(question, "yes" if bigger is a else "no", statement,
                            f"{'Yes' if bigger is a else 'No'}. {statement}"))
            out.append(Fact(f"Which is bigger, the {a.shape} or the {b.shape}?", bigger.shape, statement))
    return out


def _listing(scene: Scene, rng: random.Random) -> list[Fact]:
    if len(scene.things) < 2:
        return []
    colours, shapes = listing([t.colour for t in scene.things]), listing([t.shape for t in scene.things])
    return [Fact(rng.choice(("List the colours of the shapes.", "Name the colours in order.")), colours,
                 f"The colours are {colours}."),
            Fact(rng.choice(("List the shapes.", "Name the shapes in order.")), shapes, f"The shapes are {shapes}.")]


def arithmetic(rng: random.Random, split: str | None = None) -> Fact:
    """A sum or difference of digits (whose expression falls in `split`, when given)."""
    while True:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            expression, answer = f"{a} + {b}", a + b
        else:
            a, b = max(a, b), min(a, b)
            expression, answer = f"{a} - {b}", a - b
        if split is None or split_of(expression) == split:
            wording = rng.choice(("What is {}?", "Compute {}.", "How much is {}?"))
            return Fact(wording.format(expression), str(answer), f"{expression} = {answer}.")


def scene_question(scene: Scene, rng: random.Random, categories: tuple[str, ...], in_words: bool) -> Question:
    """One question about `scene`: a category drawn uniformly among those that apply (counting always
    does), then one of its questions."""
    options = list(categories)
    rng.shuffle(options)
    for category in options:
        found = facts(scene, rng, category)
        if found:
            fact = rng.choice(found)
            return Question(category, fact.question, fact.answer, scene, describe(scene, rng) if in_words else None)
    raise ValueError(f"categories: none of {categories} applies to {scene.key}")


def text_questions(seed: int, split: str, count: int) -> list[Question]:
    """Questions with the scene given as text, about `split` scenes; 1 in 7 is arithmetic."""
    rng = random.Random(f"text-questions:{seed}:{split}")
    out = []
    for scene in scenes(seed + 1, split, count, unique=split == "held-out"):
        if rng.randrange(len(TEXT_CATEGORIES)) == 0:
            fact = arithmetic(rng, split)
            out.append(Question("arithmetic", fact.question, fact.answer))
        else:
            out.append(scene_question(scene, rng, SCENE_CATEGORIES, in_words=True))
    return out


def image_questions(seed: int, split: str, count: int) -> list[Question]:
    """Questions about rendered `split` scenes (no text input), categories balanced."""
    rng = random.Random(f"image-questions:{seed}:{split}")
    return [scene_question(s, rng, IMAGE_CATEGORIES, in_words=False)
            for s in scenes(seed + 2, split, count, unique=split == "held-out")]
